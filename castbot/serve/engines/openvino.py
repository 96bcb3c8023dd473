"""OpenVINO GenAI's continuous batching (paged attention on CPU) behind the engine interface: serving only.

    engine = OpenVINOEngine(bot, built_export(bot.folder))
    reply = await engine.reply([("Morty", "Rick, where are we going?")], temperature=0)

The model is exported to OpenVINO IR when the Bento is built (tasks/release/openvino_export.py, with the weights'
measured test perplexity), into the servable folder (built_export); this engine serves that export and exports
nothing itself (optimum-intel's exporter needs a Python of its own). Serving needs only the openvino-genai wheel.
The pipeline runs in a process of its own (GenAI's step() holds the GIL throughout): it admits new requests, runs
the decoding steps and sends each step's new tokens back. Per request: temperature, top_p, top_k and
max_new_tokens hold. no_repeat_ngram_size does not: GenAI applies it in beam search only (greedy and sampled
decoding ignore it, measured on 2026.4.1), so it is not passed, as with transformers' continuous batching.
"""

import asyncio
import contextlib
import json
import multiprocessing
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from castbot.model.bot import Bot, sampling_settings
from castbot.model.dialogue import DECODING_DEFAULTS
from castbot.serve.engines.base import BatchingEngine, EngineError

WEIGHTS_ENV = "CASTBOT_OPENVINO_WEIGHTS"  # the weights the service expects the Bento's export to hold
KV_CACHE_GB = 1
BUILT_FOLDER, BUILT_CARD = "openvino", "castbot-openvino.json"  # the IR a Bento build puts in the model folder


def built_export(folder: str | Path) -> Path | None:
    """The OpenVINO IR made when the Bento was built (tasks/release/bento.py), inside the servable model folder."""
    target = Path(folder) / BUILT_FOLDER
    return target if (target / BUILT_CARD).is_file() else None


def read_built_card(folder: str | Path) -> dict:
    """What the build measured and chose: weights, test perplexities, the reason."""
    return json.loads((Path(folder) / BUILT_FOLDER / BUILT_CARD).read_text())


def served_export(folder: str | Path) -> Path:
    """The IR to serve: the Bento's own; an EngineError naming the fix when there is none, or when
    CASTBOT_OPENVINO_WEIGHTS asks for other weights than it holds."""
    built, wanted = built_export(folder), os.environ.get(WEIGHTS_ENV)
    if built is None:
        raise EngineError(f"{folder} holds no OpenVINO export: build the Bento with one (python -m tasks.release.bento "
                          "--openvino fp32) or serve with CASTBOT_SERVE_ENGINE=continuous")
    held = read_built_card(folder)["weights"]
    if wanted not in (None, held):
        raise EngineError(f"{WEIGHTS_ENV}={wanted}, but the Bento's OpenVINO export holds {held} weights: build it "
                          f"with --openvino {wanted}, or unset {WEIGHTS_ENV}")
    return built


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


def run_pipeline(folder: str, max_batch_size: int, threads: int, prefix_caching: bool, requests, outputs) -> None:
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
        scheduler.enable_prefix_caching = prefix_caching  # a prompt's cached start is reused by the next turn's
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


class OpenVINOEngine(BatchingEngine):
    """A Bot's model exported to OpenVINO, behind GenAI's ContinuousBatchingPipeline in a process of its own
    (run_pipeline); up to max_batch_size requests decode together. A thread here reads each step's new tokens
    and hands them to their requests."""

    needs_weights = False  # the pipeline runs the exported model: torch's copy of the weights would only take memory

    def __init__(self, bot: Bot, folder: Path, max_batch_size: int = 32, threads: int = 0,
                 prefix_caching: bool = True):
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
        their_requests, self._to_pipeline = context.Pipe(duplex=False)  # (reading end, writing end)
        self._from_pipeline, their_outputs = context.Pipe(duplex=False)
        self.process = context.Process(target=run_pipeline, name="castbot-openvino", daemon=True,
                                       args=(str(folder), max_batch_size, threads, prefix_caching, their_requests,
                                             their_outputs))
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
        return cls(bot, served_export(bot.folder), limits.max_batch_size, limits.torch_threads, limits.prefix_caching)

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

    async def _generated(self, prompt: list[int], streaming: bool, **decoding) -> AsyncIterator[list[int]]:
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
