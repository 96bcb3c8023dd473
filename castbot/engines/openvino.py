"""OpenVINO GenAI's continuous batching (paged attention on CPU) behind the engine interface.

    engine = OpenVINOEngine(bot, export_openvino(bot.folder))
    reply = await engine.reply([("Morty", "Rick, where are we going?")], temperature=0)

The model folder is exported to OpenVINO IR once per content (its weights' sha256) into the state folder, by
optimum-intel's exporter. optimum-intel 2.2 needs transformers < 5.6, so the exporter runs in a Python of its own
(CASTBOT_OPENVINO_EXPORTER, default .venv-openvino/bin/python in the working folder: `make cpu-engines` builds
it); the pipeline needs only the openvino-genai wheel. One thread owns the pipeline: it admits new requests, runs
its decoding steps and hands each request its new tokens. Per request: temperature, top_p, top_k, max_new_tokens
and no_repeat_ngram_size (the adaptive engine's settings; transformers' continuous batching lacks the last).
"""

import asyncio
import contextlib
import hashlib
import os
import queue
import subprocess
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from castbot.bot import Bot, Reply, assemble_reply, sampling_settings
from castbot.dialogue import DECODING_DEFAULTS, Turn
from castbot.engines import EngineError, Stream
from castbot.pretrained import sha256_file
from castbot.settings import STATE_DIR

EXPORTER_ENV = "CASTBOT_OPENVINO_EXPORTER"
WEIGHTS_ENV = "CASTBOT_OPENVINO_WEIGHTS"
KV_CACHE_GB = 1


def folder_digest(folder: Path) -> str:
    """sha256 over the folder's weight and config files: a new model version is a new export."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*")):
        if path.suffix in (".safetensors", ".json"):
            digest.update(f"{path.name} {sha256_file(path)}\n".encode())
    return digest.hexdigest()


def export_openvino(folder: str | Path, weights: str | None = None) -> Path:
    """The model folder as OpenVINO IR with its tokenizer (weights int8 or fp32), exported once per content."""
    folder, weights = Path(folder), weights or os.environ.get(WEIGHTS_ENV, "fp32")
    if weights not in ("int8", "fp32"):
        raise EngineError(f"{WEIGHTS_ENV}={weights}: choose int8 or fp32")
    target = STATE_DIR / "engines" / f"openvino-{weights}-{folder_digest(folder)[:16]}"
    if (target / ".complete").exists():
        return target
    exporter = Path(os.environ.get(EXPORTER_ENV, ".venv-openvino/bin/python")).absolute()
    if not exporter.exists():
        raise EngineError(f"no OpenVINO exporter at {exporter}: run `make cpu-engines` or set {EXPORTER_ENV} to a "
                          "Python with optimum-intel[openvino]")
    done = subprocess.run([str(exporter), "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model",
                           str(folder), "--task", "text-generation-with-past", "--weight-format", weights,
                           str(target)], capture_output=True, text=True)
    if done.returncode:
        last = done.stderr.strip().splitlines()[-5:]
        raise EngineError(f"the OpenVINO export of {folder} failed: " + " / ".join(last))
    (target / ".complete").touch()
    return target


@dataclass
class Request:
    """One request as the pipeline's thread sees it; `outputs` gets (token ids so far, finished) tuples."""

    prompt: list[int]
    config: object
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    handle: object = None
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False


class OpenVINOEngine:
    """A Bot's model exported to OpenVINO, behind GenAI's ContinuousBatchingPipeline; up to max_batch_size
    requests decode together."""

    def __init__(self, bot: Bot, folder: Path, max_batch_size: int = 32, threads: int = 0):
        import openvino_genai

        self.bot, self.max_batch_size, self.genai = bot, max_batch_size, openvino_genai
        scheduler = openvino_genai.SchedulerConfig()
        scheduler.max_num_seqs, scheduler.cache_size = max_batch_size, KV_CACHE_GB
        properties = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        self.pipe = openvino_genai.ContinuousBatchingPipeline(str(folder), scheduler, "CPU", properties)
        self._new: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[int, Request] = {}
        self._steps, self._next_id, self._closed = 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, name="castbot-openvino", daemon=True)
        self._thread.start()

    @classmethod
    def from_limits(cls, bot: Bot, limits, on_batch) -> "OpenVINOEngine":
        """As the service builds it (no static batches: on_batch is never called)."""
        return cls(bot, export_openvino(bot.folder), limits.max_batch_size, limits.torch_threads)

    def _config(self, max_new_tokens: int, **decoding):
        settings = {**DECODING_DEFAULTS, **decoding, "max_new_tokens": max_new_tokens}
        config = self.genai.GenerationConfig()
        config.max_new_tokens, config.min_new_tokens = settings["max_new_tokens"], 1  # never an empty reply
        config.stop_token_ids = {self.bot.tokenizer.eos_token_id}
        config.apply_chat_template = False  # the prompt is castbot's own token ids
        config.no_repeat_ngram_size = settings["no_repeat_ngram_size"] or 0
        sampled = sampling_settings(**settings)
        if sampled is not None:
            config.do_sample, config.temperature, config.top_p = True, sampled["temperature"], sampled["top_p"]
            if sampled["top_k"]:  # 0: the whole vocabulary, OpenVINO's default
                config.top_k = sampled["top_k"]
        return config

    def _admit(self) -> None:
        """Add the requests that arrived since the last step (waiting a little when nothing runs)."""
        import numpy as np
        import openvino

        block = not self._active
        while True:
            try:
                request = self._new.get(timeout=0.1) if block else self._new.get_nowait()
            except queue.Empty:
                return
            block = False
            self._next_id += 1
            ids = openvino.Tensor(np.array([request.prompt], dtype=np.int64))
            request.handle = self.pipe.add_request(self._next_id, ids, request.config)
            self._active[self._next_id] = request

    def _deliver(self) -> None:
        """Hand each request its new tokens; drop finished and cancelled ones."""
        running = self.genai.py_openvino_genai.GenerationStatus.RUNNING
        for request_id, request in list(self._active.items()):
            if request.cancelled:
                request.handle.cancel()
                del self._active[request_id]
                continue
            new = request.handle.can_read()
            if new:
                for output in request.handle.read().values():
                    request.generated += output.generated_ids
            finished = request.handle.get_status() != running and not request.handle.can_read()
            if finished:
                del self._active[request_id]
            if new or finished:  # a step that gave this request nothing wakes nobody
                with contextlib.suppress(RuntimeError):  # the waiting loop closed meanwhile
                    request.loop.call_soon_threadsafe(request.outputs.put_nowait, (list(request.generated), finished))

    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                self._admit()
                if self._active:
                    self.pipe.step()
                    self._steps += 1
                    self._deliver()
        except Exception as exc:  # a failed step fails its requests; the engine stops (not ready)
            for request in self._active.values():
                with contextlib.suppress(RuntimeError):
                    request.loop.call_soon_threadsafe(request.outputs.put_nowait, exc)
            raise
        finally:
            self._closed.set()

    def running(self) -> int:
        return len(self._active)

    def steps(self) -> int:
        return self._steps

    def ready(self) -> bool:
        return not self._closed.is_set() and self._thread.is_alive()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=30)

    async def _outputs(self, prompt: list[int], **decoding) -> AsyncIterator[list[int]]:
        """The reply's token ids so far, after every step that added some; leaving early cancels the request."""
        if not self.ready():
            raise EngineError("the OpenVINO engine's thread is not running (stopped or failed)")
        max_new = decoding.pop("max_new_tokens", DECODING_DEFAULTS["max_new_tokens"])
        request = Request(prompt, self._config(max_new, **decoding), asyncio.get_running_loop(), asyncio.Queue())
        self._new.put(request)
        finished = False
        try:
            while not finished:
                output = await request.outputs.get()
                if isinstance(output, Exception):
                    raise EngineError(f"generation failed: {output}")
                generated, finished = output
                yield generated
        finally:
            request.cancelled = not finished

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
