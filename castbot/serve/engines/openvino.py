"""OpenVINO GenAI's continuous batching (paged attention on CPU) behind the engine interface.

    engine = OpenVINOEngine(bot, export_openvino(bot.folder))
    reply = await engine.reply([("Morty", "Rick, where are we going?")], temperature=0)

A Bento build exports the model to OpenVINO IR into the servable folder (tasks/release/bento.py, with the weights'
measured test perplexity), so serving starts without exporting; a folder without one, or CASTBOT_OPENVINO_WEIGHTS
naming other weights, is exported at start-up, once per content (its weights' sha256), into the state folder.
optimum-intel 2.2 needs transformers < 5.6, so the exporter runs in a Python of its own (CASTBOT_OPENVINO_EXPORTER,
default .venv-openvino/bin/python in the working folder: `make cpu-engines` builds it); serving needs only the
openvino-genai wheel. The pipeline runs in a process of its own (GenAI's step() holds the GIL throughout): it
admits new requests, runs the decoding steps and sends each step's new tokens back. Per request: temperature,
top_p, top_k and max_new_tokens hold. no_repeat_ngram_size does not: GenAI applies it in beam search only (greedy
and sampled decoding ignore it, measured on 2026.4.1), so it is not passed, as with transformers' continuous
batching.
"""

import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from castbot.model.bot import Bot, Reply, assemble_reply, sampling_settings
from castbot.model.dialogue import DECODING_DEFAULTS, IGNORE_INDEX, Turn
from castbot.serve.engines import EngineError, Stream
from castbot.model.pretrained import sha256_file
from castbot.common.settings import STATE_DIR

EXPORTER_ENV = "CASTBOT_OPENVINO_EXPORTER"
WEIGHTS_ENV = "CASTBOT_OPENVINO_WEIGHTS"
KV_CACHE_GB = 1
BUILT_FOLDER, BUILT_CARD = "openvino", "castbot-openvino.json"  # the IR a Bento build puts in the model folder


def folder_digest(folder: Path) -> str:
    """sha256 over the folder's weight and config files: a new model version is a new export."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*")):
        if path.suffix in (".safetensors", ".json"):
            digest.update(f"{path.name} {sha256_file(path)}\n".encode())
    return digest.hexdigest()


def exporter() -> Path:
    """The Python that runs optimum-intel's exporter (CASTBOT_OPENVINO_EXPORTER, default .venv-openvino's)."""
    return Path(os.environ.get(EXPORTER_ENV, ".venv-openvino/bin/python")).absolute()


def export_openvino(folder: str | Path, weights: str | None = None, target: Path | None = None) -> Path:
    """The model folder as OpenVINO IR with its tokenizer (weights int8 or fp32), exported once per content into
    the state folder; with target, also placed there (hard links where the filesystem allows)."""
    folder, weights = Path(folder), weights or os.environ.get(WEIGHTS_ENV, "fp32")
    if weights not in ("int8", "fp32"):
        raise EngineError(f"{WEIGHTS_ENV}={weights}: choose int8 or fp32")
    cached = STATE_DIR / "engines" / f"openvino-{weights}-{folder_digest(folder)[:16]}"
    if not (cached / ".complete").exists():
        python = exporter()
        if not python.exists():
            raise EngineError(f"no OpenVINO exporter at {python}: run `make cpu-engines` or set {EXPORTER_ENV} to "
                              "a Python with optimum-intel[openvino]")
        done = subprocess.run([str(python), "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model",
                               str(folder), "--task", "text-generation-with-past", "--weight-format", weights,
                               str(cached)], capture_output=True, text=True)
        if done.returncode:
            last = done.stderr.strip().splitlines()[-5:]
            raise EngineError(f"the OpenVINO export of {folder} failed: " + " / ".join(last))
        (cached / ".complete").touch()
    if target is None:
        return cached
    shutil.copytree(cached, target, copy_function=link_or_copy)
    return target


def link_or_copy(source: str, dest: str) -> None:
    try:
        os.link(source, dest)
    except OSError:  # another filesystem
        shutil.copy2(source, dest)


def built_export(folder: str | Path) -> Path | None:
    """The OpenVINO IR made when the Bento was built (tasks/release/bento.py), inside the servable model folder."""
    target = Path(folder) / BUILT_FOLDER
    return target if (target / BUILT_CARD).is_file() else None


def read_built_card(folder: str | Path) -> dict:
    """What the build measured and chose: weights, test perplexities, the reason."""
    return json.loads((Path(folder) / BUILT_FOLDER / BUILT_CARD).read_text())


def exported_losses(folder: Path, encoded: list[dict]) -> list[tuple[float, int]]:
    """(sum of token losses in nats, target tokens) per encoded sample, from the exported model's own logits (as
    castbot.model.bot.sample_losses does for torch): the served weights' perplexity. One sample at a time: the IR keeps
    its KV cache as state, reset before each."""
    import numpy as np
    import openvino
    from scipy.special import logsumexp

    request = openvino.Core().compile_model(str(Path(folder) / "openvino_model.xml"), "CPU").create_infer_request()
    results = []
    for row in encoded:
        ids = np.array([row["input_ids"]], dtype=np.int64)
        request.reset_state()
        logits = request.infer({"input_ids": ids, "attention_mask": np.array([row["attention_mask"]], dtype=np.int64),
                                "position_ids": np.arange(ids.shape[1])[None], "beam_idx": np.zeros(1, np.int32)},
                               share_outputs=True)["logits"][0, :-1].astype(np.float64)  # position t predicts t + 1
        labels = np.array(row["labels"][1:])
        target = labels != IGNORE_INDEX
        logits, labels = logits[target], labels[target]
        log_z = logsumexp(logits, axis=-1)  # (targets,)
        results.append((float((log_z - logits[np.arange(len(labels)), labels]).sum()), int(target.sum())))
    return results


def served_folder(folder: Path) -> Path:
    """The IR to serve: the Bento's own, unless CASTBOT_OPENVINO_WEIGHTS asks for other weights (exported now)."""
    built, wanted = built_export(folder), os.environ.get(WEIGHTS_ENV)
    if built and wanted in (None, read_built_card(folder)["weights"]):
        return built
    return export_openvino(folder, wanted)


def generation_settings(eos_token_id: int, max_new_tokens: int, **decoding) -> dict:
    """A request's GenerationConfig fields, as plain values (they cross to the pipeline's process)."""
    settings = {**DECODING_DEFAULTS, **decoding, "max_new_tokens": max_new_tokens}
    fields = {"max_new_tokens": settings["max_new_tokens"], "min_new_tokens": 1,  # never an empty reply
              "stop_token_ids": {eos_token_id}, "apply_chat_template": False}  # the prompt is castbot's token ids
    sampled = sampling_settings(**settings)
    if sampled is not None:
        fields.update(do_sample=True, temperature=sampled["temperature"], top_p=sampled["top_p"])
        if sampled["top_k"]:  # 0: the whole vocabulary, OpenVINO's default
            fields["top_k"] = sampled["top_k"]
    return fields


def run_pipeline(folder: str, max_batch_size: int, threads: int, requests, outputs) -> None:
    """The pipeline's process: admit ("add", id, (prompt, settings)) and ("cancel", id, None) messages, run a
    decoding step, send ("step", [(id, new token ids, finished), ...]); ("stop", ...) or a closed pipe ends it.
    A process of its own: GenAI's step() holds the GIL for the whole step, which would stall the service's
    event loop (HTTP, streams, the chat log) for as long."""
    import numpy as np
    import openvino
    import openvino_genai

    try:
        scheduler = openvino_genai.SchedulerConfig()
        scheduler.max_num_seqs, scheduler.cache_size = max_batch_size, KV_CACHE_GB
        properties = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        pipe = openvino_genai.ContinuousBatchingPipeline(folder, scheduler, "CPU", properties)
    except Exception as exc:
        outputs.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    outputs.send(("ready", None))
    running, handles = openvino_genai.GenerationStatus.RUNNING, {}
    while True:
        while not handles or requests.poll():  # wait for work when idle, else take what has arrived
            try:
                kind, request_id, payload = requests.recv()
            except EOFError:
                return
            if kind == "stop":
                return
            if kind == "add":
                prompt, settings = payload
                config = openvino_genai.GenerationConfig()
                for name, value in settings.items():
                    setattr(config, name, value)
                handles[request_id] = pipe.add_request(
                    request_id, openvino.Tensor(np.array([prompt], dtype=np.int64)), config)
            elif request_id in handles:  # cancel
                handles.pop(request_id).cancel()
        pipe.step()
        updates = []
        for request_id, handle in list(handles.items()):
            new = [t for output in handle.read().values() for t in output.generated_ids] if handle.can_read() else []
            finished = handle.get_status() != running and not handle.can_read()
            if finished:
                del handles[request_id]
            if new or finished:
                updates.append((request_id, new, finished))
        outputs.send(("step", updates))


@dataclass
class Request:
    """One request as the service sees it; `outputs` gets (token ids so far, finished) tuples, or an exception."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    generated: list[int] = field(default_factory=list)

    def put(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # the waiting loop closed meanwhile
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


class OpenVINOEngine:
    """A Bot's model exported to OpenVINO, behind GenAI's ContinuousBatchingPipeline in a process of its own
    (run_pipeline); up to max_batch_size requests decode together. A thread here reads each step's new tokens
    and hands them to their requests."""

    def __init__(self, bot: Bot, folder: Path, max_batch_size: int = 32, threads: int = 0):
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
        their_requests, self._to_pipeline = context.Pipe(duplex=False)  # (reading end, writing end)
        self._from_pipeline, their_outputs = context.Pipe(duplex=False)
        self.process = context.Process(target=run_pipeline, name="castbot-openvino", daemon=True,
                                       args=(str(folder), max_batch_size, threads, their_requests, their_outputs))
        self.process.start()
        their_requests.close(), their_outputs.close()
        self.bot, self.max_batch_size = bot, max_batch_size
        kind, detail = self._from_pipeline.recv() if self._from_pipeline.poll(300) else ("failed", "no answer in 300 s")
        if kind != "ready":
            self.process.kill()
            raise EngineError(f"the OpenVINO pipeline did not start on {folder}: {detail}")
        self._active: dict[int, Request] = {}
        self._send_lock, self._steps, self._next_id, self._closed = threading.Lock(), 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._read, name="castbot-openvino-reader", daemon=True)
        self._thread.start()

    @classmethod
    def from_limits(cls, bot: Bot, limits, on_batch) -> "OpenVINOEngine":
        """As the service builds it (no static batches: on_batch is never called)."""
        return cls(bot, served_folder(bot.folder), limits.max_batch_size, limits.torch_threads)

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._to_pipeline.send(message)

    def _read(self) -> None:
        """Each step's new tokens to their requests; a pipeline process that died fails the requests it held."""
        try:
            while True:
                kind, updates = self._from_pipeline.recv()  # waits outside the GIL
                self._steps += 1
                for request_id, new, finished in updates:
                    request = self._active.pop(request_id, None) if finished else self._active.get(request_id)
                    if request is not None:
                        request.generated += new
                        request.put((list(request.generated), finished))
        except (EOFError, OSError):
            pass
        finally:
            self._closed.set()
            for request in list(self._active.values()):
                request.put(EngineError("the OpenVINO pipeline's process ended"))

    def running(self) -> int:
        return len(self._active)

    def steps(self) -> int:
        return self._steps

    def ready(self) -> bool:
        return not self._closed.is_set() and self.process.is_alive()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send(("stop", 0, None))
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
        self._thread.join(timeout=30)

    async def _outputs(self, prompt: list[int], **decoding) -> AsyncIterator[list[int]]:
        """The reply's token ids so far, after every step that added some; leaving early cancels the request."""
        if not self.ready():
            raise EngineError("the OpenVINO engine's pipeline is not running (stopped or failed)")
        max_new = decoding.pop("max_new_tokens", DECODING_DEFAULTS["max_new_tokens"])
        settings = generation_settings(self.bot.tokenizer.eos_token_id, max_new, **decoding)
        request = Request(asyncio.get_running_loop(), asyncio.Queue())
        with self._send_lock:
            self._next_id += 1
            request_id = self._next_id
            self._active[request_id] = request
            self._to_pipeline.send(("add", request_id, (prompt, settings)))
        finished = False
        try:
            while not finished:
                output = await request.outputs.get()
                if isinstance(output, Exception):
                    raise EngineError(f"generation failed: {output}")
                generated, finished = output
                yield generated
        finally:
            if not finished and self._active.pop(request_id, None) is not None and self.ready():
                with contextlib.suppress(OSError):
                    self._send(("cancel", request_id, None))

    def _prompt(self, turns: list[Turn], decoding: dict) -> list[int]:
        return self.bot.prompt(turns, decoding.get("max_new_tokens", DECODING_DEFAULTS["max_new_tokens"]))

    def stream(self, turns: list[Turn], **decoding) -> Stream:
        """The reply's text piece by piece as it is generated; closing the stream cancels the request."""
        prompt = self._prompt(turns, decoding)
        return Stream(self.bot.tokenizer, len(prompt), self._outputs(prompt, **decoding))

    async def reply(self, turns: list[Turn], **decoding) -> Reply:
        prompt = self._prompt(turns, decoding)
        generated = []
        async for generated in self._outputs(prompt, **decoding):
            pass
        return assemble_reply(self.bot.tokenizer, len(prompt), generated)

    def replies(self, conversations: list[list[Turn]], **decoding) -> list[Reply]:
        """One reply per conversation, all submitted at once (for benchmarks and tests, outside an event loop)."""

        async def all_replies():
            return await asyncio.gather(*(self.reply(turns, **decoding) for turns in conversations))

        return asyncio.run(all_replies())
