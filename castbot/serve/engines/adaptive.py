"""BentoML's adaptive batching: concurrent requests are corked into static batches, one left-padded Bot.generate()
call each.

The batching is BentoML's own CorkDispatcher, the algorithm behind `@bentoml.api(batchable=True)`: it learns how
long a batch of n takes (first requests run alone while it measures), holds requests while waiting for more pays
off, never beyond max_latency, and refuses a request that would wait longer (EngineBusy, a 503). Used in the
process (castbot/compat/bentoml_fixes.py: cork_dispatcher), so /chat and /generate share batches without the service
calling itself over HTTP. One batch runs at a time, in a thread of its own; a batch is split by decoding settings
(one generate() call per group). Streams run alone, in a thread of their own, token by token.

    engine = AdaptiveEngine(bot, max_batch_size=32)
    reply = await engine.reply([("Morty", "Rick, where are we going?")], temperature=0)
"""

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from castbot.model.bot import Bot, Reply
from castbot.model.dialogue import DECODING_DEFAULTS, Turn
from castbot.serve.engines.base import EngineBusy, EngineError, Stream

TIMED_OUT = object()  # the dispatcher's answer for a request it dropped after max_latency


@dataclass
class _Job:
    turns: list[Turn]
    decoding: dict  # DECODING_DEFAULTS filled in
    character: str | None = None  # a cast model's member (None: its first); jobs of any members share a batch

    def settings(self) -> tuple:
        """Jobs with equal settings share one generate() call."""
        return tuple(sorted(self.decoding.items()))


class AdaptiveEngine:
    """A Bot answering concurrent requests in adaptive static batches of up to max_batch_size, one at a time."""

    needs_weights = True

    def __init__(self, bot: Bot, max_batch_size: int = 32, max_latency_s: float = 30.0,
                 on_batch: Callable[[int], None] = lambda size: None):
        self.bot, self.max_batch_size, self.max_latency_s, self.on_batch = bot, max_batch_size, max_latency_s, on_batch
        self._running = 0  # prompts in the generate() call now running
        self._closed = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="castbot-engine-batches")
        self._dispatcher, self._loop = None, None  # made on the first request, for the event loop it came on

    @classmethod
    def from_limits(cls, bot: Bot, limits, on_batch: Callable[[int], None]) -> "AdaptiveEngine":
        """As the service builds it: CASTBOT_SERVE_BATCHING=false runs one prompt at a time."""
        return cls(bot, limits.max_batch_size if limits.batching else 1, limits.max_latency_ms / 1000, on_batch)

    def running(self) -> int:
        return self._running

    def steps(self) -> int:
        return 0  # generate() decodes inside transformers: steps are not counted

    def ready(self) -> bool:
        """Not closed, and the dispatcher's loop task (once started) still running."""
        controller = self._dispatcher and self._dispatcher.controller_task
        return not self._closed and (controller is None or not controller.done())

    def close(self) -> None:
        self._closed = True
        if self._dispatcher is not None:
            self._dispatcher.shutdown()
        self._pool.shutdown(wait=True)

    async def reply(self, turns: list[Turn], character: str | None = None, **decoding) -> Reply:
        """The reply, from the batch the dispatcher puts this request in."""
        from castbot.compat.bentoml_fixes import cork_dispatcher

        if not self.ready():
            raise EngineError("the adaptive engine is not running (closed or its dispatcher failed)")
        if self._loop is not asyncio.get_running_loop():  # the service has one loop; tests may run several
            if self._dispatcher is not None:
                self._dispatcher.shutdown()
            self._dispatcher = cork_dispatcher(self._run, self.max_batch_size, self.max_latency_s,
                                               fallback=lambda: TIMED_OUT)
            self._loop = asyncio.get_running_loop()
        result = await self._dispatcher(_Job(turns, {**DECODING_DEFAULTS, **decoding}, character))
        if result is TIMED_OUT:
            if asyncio.current_task().cancelling():  # the caller left: not a refusal
                raise asyncio.CancelledError
            raise EngineBusy(f"would wait over {self.max_latency_s:g} s for a batch (CASTBOT_SERVE_MAX_LATENCY_MS); "
                             "retry shortly")
        if isinstance(result, BaseException):
            raise result
        return result

    async def _run(self, jobs: Sequence[_Job]) -> list[Reply | Exception]:
        """The dispatcher's batch callback: the batch in the engine's thread, so the event loop stays free."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._generate, list(jobs))

    def _generate(self, jobs: list[_Job]) -> list[Reply | Exception]:
        """One generate() call per group of equal settings; a failure is handed to that group's callers."""
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.settings(), []).append(i)
        results: list[Reply | Exception] = [EngineError("not run")] * len(jobs)
        for indices in groups.values():
            self.on_batch(len(indices))
            self._running = len(indices)
            try:
                replies = self.bot.generate([jobs[i].turns for i in indices],
                                            characters=[jobs[i].character for i in indices],
                                            **jobs[indices[0]].decoding)
            except Exception as exc:  # the callers get it; the engine lives on
                replies = [EngineError(f"generation failed: {exc}")] * len(indices)
            finally:
                self._running = 0
            for i, reply in zip(indices, replies):
                results[i] = reply
        return results

    def stream(self, turns: list[Turn], character: str | None = None, **decoding) -> Stream:
        """The reply's text piece by piece, from a generate() call of its own; closing the stream stops it at the
        next token."""
        max_new = decoding.get("max_new_tokens", DECODING_DEFAULTS["max_new_tokens"])
        return Stream(self.bot.tokenizer, lambda: self.bot.prompt(turns, max_new, character),  # generate() builds it
                      lambda prompt: self._tokens(turns, decoding, character))

    async def _tokens(self, turns: list[Turn], decoding: dict, character: str | None) -> AsyncIterator[list[int]]:
        """The reply's generated ids so far, once per new token, from Bot.generate in a thread."""
        from transformers import StoppingCriteria
        from transformers.generation.streamers import BaseStreamer

        loop, arrived = asyncio.get_running_loop(), asyncio.Queue()
        stop, END = threading.Event(), object()

        def send(item) -> None:
            try:
                loop.call_soon_threadsafe(arrived.put_nowait, item)
            except RuntimeError:  # the reader's loop closed: it left
                pass

        class Tokens(BaseStreamer):
            """generate() puts the prompt first, then each new token ((1,) tensor); end() when done."""
            prompt_seen = False

            def put(self, value) -> None:
                if self.prompt_seen:
                    send(value.reshape(-1).tolist())
                self.prompt_seen = True

            def end(self) -> None:
                send(END)

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stop.is_set()

        def work() -> None:
            try:
                self.bot.generate([turns], streamer=Tokens(), stopping_criteria=[Stop()], characters=[character],
                                  **decoding)
            except BaseException as exc:  # surfaced below; the stream must still end, or the reader waits forever
                send(exc)

        threading.Thread(target=work, name="castbot-engine-stream", daemon=True).start()
        tokens: list[int] = []
        try:
            while (item := await arrived.get()) is not END:
                if isinstance(item, BaseException):
                    raise EngineError(f"generation failed: {item}") from item
                tokens += item
                yield list(tokens)
        finally:
            stop.set()  # a client that left (or a timeout) stops generation at the next token
