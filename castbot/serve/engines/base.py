"""What every engine shares: its errors, the Stream a reply is read from, the interface the service calls, and the
request path the continuous-batching engines (transformers', OpenVINO's) have in common.

A prompt (tokenising the history, trimming it to the token budget) is built in a worker thread, never on the
event loop: a burst of 50 KB histories would otherwise hold it for seconds and /livez with it.
"""

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from castbot.model.bot import Bot, Reply, assemble_reply
from castbot.model.dialogue import DECODING_DEFAULTS, Turn, decode_reply

# A chat or scene longer than the prompt budget loses its oldest turns this many at a time, so consecutive turns'
# prompts start alike and the OpenVINO engine's prefix cache reuses that start (bench/cast_serving.py --only prefix).
PROMPT_STEP = 4


class EngineError(RuntimeError):
    """The engine failed a request, or is not accepting requests."""


class EngineBusy(EngineError):
    """A request waited in the engine's queue past its latency budget (the service answers 503)."""


class Stream:
    """One reply as it is generated: `async for piece in stream` gives its text piece by piece; afterwards
    stream.reply is the whole Reply or, when the consumer stopped early (aclose), the part generated so far with
    finish_reason "cancelled". prompt() builds the prompt's token ids (in a worker thread, when the stream starts or
    at `await stream.prompted()`); generate(prompt ids) gives the reply's generated token ids so far, once per token."""

    def __init__(self, tokenizer, prompt: Callable[[], list[int]],
                 generate: Callable[[list[int]], AsyncIterator[list[int]]]):
        self.tokenizer, self._prompt, self._generate = tokenizer, prompt, generate
        self.prompt_ids: list[int] | None = None
        self.reply = Reply("", 0, 0, "cancelled")  # until it is iterated
        self._pieces = self._run()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces

    async def aclose(self) -> None:
        """Stop early: the engine cancels the request and reply becomes the part so far."""
        await self._pieces.aclose()

    async def prompted(self) -> list[int]:
        """The prompt's token ids, built once, off the event loop."""
        if self.prompt_ids is None:
            self.prompt_ids = await asyncio.to_thread(self._prompt)
            self.reply = Reply("", len(self.prompt_ids), 0, "cancelled")
        return self.prompt_ids

    async def _run(self) -> AsyncIterator[str]:
        prompt = await self.prompted()
        generated = self._generate(prompt)
        tokens, sent, finished = [], "", False
        try:
            async for tokens in generated:
                text = decode_reply(self.tokenizer, tokens)
                if text.startswith(sent) and len(text) > len(sent) and not text.endswith("\ufffd"):
                    yield text[len(sent):]  # held back while it ends inside a multi-byte character
                    sent = text
            finished = True
        finally:
            self.reply = assemble_reply(self.tokenizer, len(prompt), list(tokens), cancelled=not finished)
            await generated.aclose()


class Engine(Protocol):
    """What the service needs of an engine. Built as Engine.from_limits(bot, limits, on_batch) by make_engine."""

    needs_weights: bool  # whether the Bot must hold torch's copy of the weights (not when the engine runs its own)
    max_batch_size: int  # most requests decoding together

    @classmethod
    def from_limits(cls, bot: Bot, limits, on_batch: Callable[[int], None]) -> "Engine":
        """As the service builds it, from its ServeLimits; on_batch(size) per static batch run."""

    async def reply(self, turns: list[Turn], character: str | None = None, **decoding) -> Reply: ...

    def stream(self, turns: list[Turn], character: str | None = None, **decoding) -> Stream: ...

    def running(self) -> int:
        """Requests in the batch now decoding."""

    def steps(self) -> int:
        """Decoding steps run so far (0 where the engine does not count them)."""

    def ready(self) -> bool:
        """True while the engine accepts and runs requests (its threads alive)."""

    def close(self) -> None: ...


class BatchingEngine:
    """The request path of the continuous-batching engines: the Bot builds the prompt's token ids, and the engine's
    _generated(prompt ids, streaming, **decoding) gives the reply's generated ids so far (every token when
    streaming, at least the last otherwise); leaving it early cancels the request."""

    needs_weights = True
    bot: Bot
    max_batch_size: int

    def _generated(self, prompt: list[int], streaming: bool, **decoding) -> AsyncIterator[list[int]]:
        raise NotImplementedError

    def _prompt(self, turns: list[Turn], decoding: dict, character: str | None) -> list[int]:
        return self.bot.prompt(turns, decoding.get("max_new_tokens", DECODING_DEFAULTS["max_new_tokens"]), character,
                               PROMPT_STEP)

    def stream(self, turns: list[Turn], character: str | None = None, **decoding) -> Stream:
        """The reply's text piece by piece as it is generated; closing the stream cancels the request."""
        return Stream(self.bot.tokenizer, lambda: self._prompt(turns, decoding, character),
                      lambda prompt: self._generated(prompt, True, **decoding))

    async def reply(self, turns: list[Turn], character: str | None = None, **decoding) -> Reply:
        prompt = await asyncio.to_thread(self._prompt, turns, decoding, character)
        generated = []
        async for tokens in self._generated(prompt, False, **decoding):
            generated = tokens
        return assemble_reply(self.bot.tokenizer, len(prompt), generated)

    def replies(self, conversations: list[list[Turn]], **decoding) -> list[Reply]:
        """One reply per conversation, all submitted at once (for benchmarks and tests, outside an event loop)."""

        async def all_replies():
            return await asyncio.gather(*(self.reply(turns, **decoding) for turns in conversations))

        return asyncio.run(all_replies())
