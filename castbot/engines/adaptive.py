"""Static batches: concurrent requests queue up and run together in one left-padded Bot.generate() call.

One thread owns the model. While it runs a batch, new requests wait in its queue; when it is free it takes all
that waited (up to max_batch_size), groups them by decoding settings (one generate() call per group) and answers
each on its own event loop. So /chat and /generate calls share batches without the service calling itself, and
no request waits for a batch to fill. A request still queued after max_latency_s is refused with EngineBusy.
Streams run alone, in a thread of their own, token by token.

    engine = AdaptiveEngine(bot, max_batch_size=32)
    reply = await engine.reply([("Morty", "Rick, where are we going?")], temperature=0)
"""

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from castbot.bot import Bot, Reply
from castbot.dialogue import DECODING_DEFAULTS, Turn
from castbot.engines import EngineBusy, EngineError, Stream


@dataclass
class _Job:
    turns: list[Turn]
    decoding: dict  # DECODING_DEFAULTS filled in
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)

    def settings(self) -> tuple:
        """Jobs with equal settings share one generate() call."""
        return tuple(sorted(self.decoding.items()))

    def settle(self, result: Reply | BaseException) -> None:
        """Answer on the job's own loop (a future already cancelled, by a client that left, is skipped)."""
        def answer() -> None:
            if self.future.done():
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(answer)
        except RuntimeError:  # that loop closed meanwhile
            pass


class AdaptiveEngine:
    """A Bot answering queued requests in static batches of up to max_batch_size, one batch at a time."""

    def __init__(self, bot: Bot, max_batch_size: int = 32, max_latency_s: float = 30.0,
                 on_batch: Callable[[int], None] = lambda size: None):
        self.bot, self.max_batch_size, self.max_latency_s, self.on_batch = bot, max_batch_size, max_latency_s, on_batch
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._running = 0  # prompts in the generate() call now running
        self._closed = threading.Event()
        self._worker = threading.Thread(target=self._serve, name="castbot-engine-batches", daemon=True)
        self._worker.start()

    @classmethod
    def from_limits(cls, bot: Bot, limits, on_batch: Callable[[int], None]) -> "AdaptiveEngine":
        """As the service builds it: CASTBOT_SERVE_BATCHING=false runs one prompt at a time."""
        return cls(bot, limits.max_batch_size if limits.batching else 1, limits.max_latency_ms / 1000, on_batch)

    def running(self) -> int:
        return self._running

    def steps(self) -> int:
        return 0  # generate() decodes inside transformers: steps are not counted

    def ready(self) -> bool:
        """The batch thread is alive."""
        return not self._closed.is_set() and self._worker.is_alive()

    def close(self) -> None:
        self._closed.set()
        self._worker.join(timeout=30)

    async def reply(self, turns: list[Turn], **decoding) -> Reply:
        """The reply, from the next batch the worker runs."""
        if not self.ready():
            raise EngineError("the adaptive engine's batch thread is not running (closed or failed)")
        loop = asyncio.get_running_loop()
        job = _Job(turns, {**DECODING_DEFAULTS, **decoding}, loop, loop.create_future())
        self._jobs.put(job)
        return await job.future

    def _serve(self) -> None:
        """The worker: take what queued up while the last batch ran, run it, repeat until closed."""
        while not self._closed.is_set():
            try:
                jobs = [self._jobs.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(jobs) < self.max_batch_size:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        """One generate() call per group of equal settings; late jobs refused, failures handed to their callers."""
        now, groups = time.monotonic(), {}
        for job in jobs:
            if now - job.queued_at > self.max_latency_s:
                job.settle(EngineBusy(f"waited over {self.max_latency_s:g} s for a batch "
                                      "(CASTBOT_SERVE_MAX_LATENCY_MS); retry shortly"))
            elif not job.future.done():  # not abandoned while it waited
                groups.setdefault(job.settings(), []).append(job)
        for group in groups.values():
            self.on_batch(len(group))
            self._running = len(group)
            try:
                replies = self.bot.generate([job.turns for job in group], **group[0].decoding)
            except Exception as exc:  # the callers get it; the worker lives on
                replies = [EngineError(f"generation failed: {exc}")] * len(group)
            finally:
                self._running = 0
            for job, reply in zip(group, replies):
                job.settle(reply)

    def stream(self, turns: list[Turn], **decoding) -> Stream:
        """The reply's text piece by piece, from a generate() call of its own; closing the stream stops it at the
        next token."""
        max_new = decoding.get("max_new_tokens", DECODING_DEFAULTS["max_new_tokens"])
        prompt = self.bot.prompt(turns, max_new)
        return Stream(self.bot.tokenizer, len(prompt), self._tokens(turns, decoding))

    async def _tokens(self, turns: list[Turn], decoding: dict) -> AsyncIterator[list[int]]:
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
                self.bot.generate([turns], streamer=Tokens(), stopping_criteria=[Stop()], **decoding)
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
