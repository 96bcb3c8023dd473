"""One reply path and one stream path for every route: /chat, /generate and /v1/chat/completions call
Replies.reply, /chat/stream and the streamed /v1/chat/completions call Replies.stream. The engine answers, stop
strings cut the reply, and the finished turn is logged (castbot/serve/turn_log.py) and counted
(castbot/serve/metrics.py) once, whatever its end. A route only says how its stream's events are written.

    reply = await replies.reply("/chat", prompt, new_turn(None))
    async for event in replies.stream("/chat/stream", prompt, turn, ChatEvents(replies.identity, turn)): ...

The prompt is built (tokenised, trimmed to the token budget) by the engine off the event loop.
"""

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Protocol

from castbot.model.bot import Reply
from castbot.serve.engines import Engine
from castbot.serve.metrics import EngineMetrics
from castbot.serve.openai_protocol import StopCutter, cut_at_stop
from castbot.serve.schemas import ChatReply, Prompt, as_generation, conversation
from castbot.serve.turn_log import TurnLog


class StreamEvents(Protocol):
    """How a route writes a streamed reply: its first event, one per piece of text, and its last events."""

    def start(self) -> str: ...

    def piece(self, text: str) -> str: ...

    def done(self, reply: Reply, stopped: bool) -> list[str]: ...


class ChatEvents:
    """/chat/stream's server-sent events: `event: start` with the model's identity, `data: {"text": ...}` per
    piece, then `event: done` with the whole reply, its token counts and the identity."""

    def __init__(self, identity: dict[str, str], turn: dict[str, str]):
        self.identity, self.turn = identity, turn

    def start(self) -> str:
        return f"event: start\ndata: {json.dumps(self.identity)}\n\n"

    def piece(self, text: str) -> str:
        return f"data: {json.dumps({'text': text})}\n\n"

    def done(self, reply: Reply, stopped: bool) -> list[str]:
        final = ChatReply(**as_generation(reply, self.turn).model_dump(), **self.identity)
        return [f"event: done\ndata: {final.model_dump_json()}\n\n"]


def cut(reply: Reply, stops: Sequence[str]) -> Reply:
    """The reply up to its first stop string (finish_reason "stop" when one was found)."""
    text, stopped = cut_at_stop(reply.reply, list(stops))
    return dataclasses.replace(reply, reply=text, finish_reason="stop") if stopped else reply


class UnknownCharacter(LookupError):
    """A request names someone outside the served model's cast (the routes answer 404 and name the cast)."""


class Replies:
    """The served model's engine, as every route reaches it; identity is the model's name, version and (default)
    character; cast is everyone the model speaks as, the first being the default (one character: just that one)."""

    def __init__(self, engine: Engine, cast: Sequence[str], identity: dict[str, str], turns: TurnLog):
        self.engine, self.cast, self.identity, self.turns = engine, tuple(cast), identity, turns
        self.character = self.cast[0]
        self.metrics = EngineMetrics(engine)

    def speaker(self, requested: str | None) -> str:
        """The cast member a request names (any case), or the first; UnknownCharacter names the cast."""
        if not requested:
            return self.character
        found = [name for name in self.cast if name.casefold() == requested.strip().casefold()]
        if not found:
            raise UnknownCharacter(f"{self.identity['model_name']} does not speak as {requested!r}: its cast is "
                                   f"{', '.join(self.cast)}")
        return found[0]

    def identity_of(self, character: str) -> dict[str, str]:
        """The model's identity as one member of its cast answers."""
        return {**self.identity, "character": character}

    async def reply(self, endpoint: str, prompt: Prompt, turn: dict[str, str], stops: Sequence[str] = ()) -> Reply:
        """One reply, cut at the first stop string. Engine errors (EngineBusy: a 503) reach the route, which answers
        them in its own shape, after the turn is logged as an error."""
        character = self.speaker(prompt.character)  # before anything runs or is logged
        started = time.perf_counter()
        reply = Reply("", 0, 0, "error")
        try:
            reply = cut(await self.engine.reply(conversation(prompt, character), character=character,
                                                **prompt.decoding()), stops)
        except asyncio.CancelledError:  # the client left (or the request timed out)
            reply = Reply("", 0, 0, "cancelled")
            raise
        finally:
            await self._finished(endpoint, prompt, character, reply, started, None, turn)
        return reply

    async def stream(self, endpoint: str, prompt: Prompt, turn: dict[str, str], events: StreamEvents,
                     stops: Sequence[str] = ()) -> AsyncGenerator[str, None]:
        """The reply as the route's events: start once the prompt is built, a piece as text arrives (held back
        while it may begin a stop string; the stream ends at one), then done. A client that leaves cancels it."""
        character = self.speaker(prompt.character)
        started, first_piece_at = time.perf_counter(), None
        stream = self.engine.stream(conversation(prompt, character), character=character, **prompt.decoding())
        cutter, failed, begun = StopCutter(list(stops)), True, False
        try:
            await stream.prompted()
            yield events.start()
            async with contextlib.aclosing(stream):  # leaving it early (a stop string, a client gone) cancels
                async for piece in stream:
                    first_piece_at = first_piece_at or time.perf_counter()
                    piece = piece if begun else piece.lstrip()  # the reply's text starts at its first non-blank
                    begun = begun or bool(piece)
                    if text := cutter.feed(piece):
                        yield events.piece(text)
                    if cutter.stopped:
                        break
            if rest := cutter.flush().rstrip():
                yield events.piece(rest)
            failed = False
        except (GeneratorExit, asyncio.CancelledError):  # the client left: stream.reply is "cancelled"
            failed = False
            raise
        finally:
            reply = stream.reply
            if cutter.stopped:
                reply = dataclasses.replace(reply, reply=cut_at_stop(reply.reply or cutter.text, list(stops))[0],
                                            finish_reason="stop")
            elif failed:
                reply = dataclasses.replace(reply, finish_reason="error")
            await self._finished(endpoint, prompt, character, reply, started, first_piece_at, turn)
        for event in events.done(reply, cutter.stopped):
            yield event

    async def _finished(self, endpoint: str, prompt: Prompt, character: str, reply: Reply, started: float,
                        first_piece_at: float | None, turn: dict[str, str]) -> None:
        """Every finished turn passes here once: logged (committed before the reply goes out), then counted."""
        await self.turns.record(endpoint, prompt, character, reply, started, first_piece_at, turn)
        self.metrics.turn_finished(reply.new_tokens, None if first_piece_at is None else first_piece_at - started)
