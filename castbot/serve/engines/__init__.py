"""Engines: how the service turns conversations into replies. Each engine is one object behind one interface
(Engine below), chosen once by name (CASTBOT_SERVE_ENGINE, "auto" by default: resolve_engine); a new engine is
one module plus a line in ENGINES.

    engine = make_engine("continuous", bot, limits)
    reply = await engine.reply([("Morty", "Rick, where are we going?")], temperature=0)
    stream = engine.stream(turns, max_new_tokens=40)
    async for piece in stream: ...                 # then stream.reply, finish_reason "cancelled" if left early
"""

import importlib
import importlib.util
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from castbot.model.bot import Reply, assemble_reply
from castbot.model.dialogue import Turn, decode_reply

# name -> "module:class"; imported only when chosen (torch and transformers are heavy)
ENGINES = {
    "continuous": "castbot.serve.engines.continuous:ContinuousEngine",  # transformers' continuous batching
    "adaptive": "castbot.serve.engines.adaptive:AdaptiveEngine",  # static left-padded batches of queued requests
    "openvino": "castbot.serve.engines.openvino:OpenVINOEngine",  # OpenVINO GenAI's continuous batching (make cpu-engines)
}


class EngineError(RuntimeError):
    """The engine failed a request, or is not accepting requests."""


class EngineBusy(EngineError):
    """A request waited in the engine's queue past its latency budget (the service answers 503)."""


class Stream:
    """One reply as it is generated: `async for piece in stream` gives its text piece by piece; afterwards
    stream.reply is the whole Reply or, when the consumer stopped early (aclose), the part generated so far with
    finish_reason "cancelled". An engine feeds it the reply's generated token ids so far, once per new token."""

    def __init__(self, tokenizer, prompt_tokens: int, generated: AsyncIterator[list[int]]):
        self.tokenizer, self.prompt_tokens, self._generated = tokenizer, prompt_tokens, generated
        self.reply = Reply("", prompt_tokens, 0, "cancelled")  # until it is iterated
        self._pieces = self._run()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces

    async def aclose(self) -> None:
        """Stop early: the engine cancels the request and reply becomes the part so far."""
        await self._pieces.aclose()

    async def _run(self) -> AsyncIterator[str]:
        tokens, sent, finished = [], "", False
        try:
            async for tokens in self._generated:
                text = decode_reply(self.tokenizer, tokens)
                if text.startswith(sent) and len(text) > len(sent) and not text.endswith("\ufffd"):
                    yield text[len(sent):]  # held back while it ends inside a multi-byte character
                    sent = text
            finished = True
        finally:
            self.reply = assemble_reply(self.tokenizer, self.prompt_tokens, list(tokens), cancelled=not finished)
            await self._generated.aclose()


class Engine(Protocol):
    """What the service needs of an engine. Built as Engine(bot, limits, on_batch) by make_engine."""

    max_batch_size: int  # most requests decoding together

    async def reply(self, turns: list[Turn], **decoding) -> Reply: ...

    def stream(self, turns: list[Turn], **decoding) -> Stream: ...

    def running(self) -> int:
        """Requests in the batch now decoding."""

    def steps(self) -> int:
        """Decoding steps run so far (0 where the engine does not count them)."""

    def ready(self) -> bool:
        """True while the engine accepts and runs requests (its threads alive)."""

    def close(self) -> None: ...


def resolve_engine(name: str, folder: str, device: str) -> str:
    """The engine "auto" means for a model folder on a device: OpenVINO's on CPU when the Bento was built with
    its export (the fastest measured on CPU, bench/serve_throughput.py --engines), else transformers' continuous
    batching."""
    if name != "auto":
        return name
    from castbot.serve.engines.openvino import built_export

    on_cpu = device == "cpu"
    return "openvino" if on_cpu and built_export(folder) and importlib.util.find_spec("openvino_genai") \
        else "continuous"


def make_engine(name: str, bot, limits, on_batch: Callable[[int], None] = lambda size: None) -> Engine:
    """The engine ENGINES names, built from the service's limits; on_batch(size) is called per static batch run."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}: choose one of {sorted(ENGINES)} (CASTBOT_SERVE_ENGINE)")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls).from_limits(bot, limits, on_batch)
