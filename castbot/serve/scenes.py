"""POST /scene: cast members speaking in turn after an opening line, streamed as server-sent events.

    event: start   {"model_name", "model_version", "characters", "conversation_id"}
    event: turn    {"speaker", "turn_id"}                 before each line
    data:          {"speaker", "text"}                    per piece of it, as it is generated
    event: said    {"speaker", "reply", "turn_id", ...}   once the line is finished
    event: done    {"conversation_id", "lines": [{"speaker", "text", "turn_id"}, ...], ...}

Each line is one turn of the reply path (castbot/serve/replies.py): the same engine, stop rules and conversation
log as /chat/stream, prompted with everything said so far and answered as its speaker. A line that comes out blank
is logged and left out of what the next speakers hear. A scene whose conversation is deleted while it plays stops
after the line being said (done carries "stopped": "deleted"); nothing more of it is logged.
"""

import contextlib
import json
from collections.abc import AsyncGenerator
from datetime import UTC, datetime

from castbot.model.bot import Reply
from castbot.serve.replies import Replies
from castbot.serve.schemas import Prompt, SceneRequest, Turn, as_generation
from castbot.serve.turn_log import new_turn


class LineEvents:
    """One line's events (the StreamEvents of Replies.stream): its speaker before it, each piece named, then the
    finished line, which is kept for the next speakers."""

    def __init__(self, speaker: str, turn: dict[str, str]):
        self.speaker, self.turn, self.reply = speaker, turn, Reply("", 0, 0, "cancelled")

    def start(self) -> str:
        return f"event: turn\ndata: {json.dumps({'speaker': self.speaker, 'turn_id': self.turn['turn_id']})}\n\n"

    def piece(self, text: str) -> str:
        return f"data: {json.dumps({'speaker': self.speaker, 'text': text})}\n\n"

    def done(self, reply: Reply, stopped: bool) -> list[str]:
        self.reply = reply
        said = {"speaker": self.speaker, **as_generation(reply, self.turn).model_dump(),
                "finish_reason": reply.finish_reason}
        return [f"event: said\ndata: {json.dumps(said)}\n\n"]


def opening_turn(request: SceneRequest) -> Turn:
    """The opening as a named turn (a plain text is the user's)."""
    return request.opening if isinstance(request.opening, Turn) else Turn(text=request.opening)


async def play(replies: Replies, request: SceneRequest, first: dict[str, str]) -> AsyncGenerator[str, None]:
    """The scene's events; first is the first line's turn ids (its conversation already claimed by the route).
    The names must have been checked against the cast (replies.speaker); none: the whole cast speaks."""
    speakers = [replies.speaker(name) for name in request.characters] or list(replies.cast)
    said, lines, turn, began, stopped = [opening_turn(request)], [], first, datetime.now(UTC), None
    start = {"model_name": replies.identity["model_name"], "model_version": replies.identity["model_version"],
             "characters": speakers, "conversation_id": first["conversation_id"]}
    yield f"event: start\ndata: {json.dumps(start)}\n\n"
    for index in range(request.turns):
        speaker = speakers[index % len(speakers)]
        prompt = Prompt.model_construct(turns=list(said), character=speaker, **request.decoding())
        events = LineEvents(speaker, turn)
        async with contextlib.aclosing(replies.stream("/scene", prompt, turn, events)) as stream:
            async for event in stream:  # a client that leaves closes it: the line is logged as cancelled
                yield event
        if text := events.reply.reply.strip():
            said.append(Turn.model_construct(speaker=speaker, text=text))
            lines.append({"speaker": speaker, "text": text, "turn_id": turn["turn_id"]})
        turn = new_turn(first["conversation_id"])
        if index + 1 < request.turns and await replies.turns.deleted_since(first["conversation_id"], began):
            stopped = "deleted"
            break
    done = {"model_name": replies.identity["model_name"], "model_version": replies.identity["model_version"],
            "conversation_id": first["conversation_id"], "lines": lines, "stopped": stopped}
    yield f"event: done\ndata: {json.dumps(done)}\n\n"
