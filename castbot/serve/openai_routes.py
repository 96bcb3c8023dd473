"""OpenAI's chat-completions routes, mounted by service.py at /v1: the FastAPI app and its handlers. The protocol
(shapes, the mapping to castbot prompts, stop strings, errors) is castbot/serve/openai_protocol.py; the replies
come from the service's one reply path (castbot/serve/replies.py), with the same engine, limits, admission,
metrics and conversation log as /chat.

Left out of /docs.json: OpenAI's own spec describes these routes, and OpenAPI 3.0 cannot say which valid-looking
requests castbot refuses (the last message not the user's, a seed while sampling).
"""

import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Annotated

import bentoml
from fastapi import Depends, FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from castbot.model.bot import Reply
from castbot.serve import openai_protocol as openai_api
from castbot.serve.engines import EngineBusy, EngineError
from castbot.serve.replies import Replies, UnknownCharacter
from castbot.serve.turn_log import NotYours

ENDPOINT = "/v1/chat/completions"
logger = logging.getLogger("castbot.service")
app = FastAPI(title="castbot OpenAI-compatible API", openapi_url=None, docs_url=None, redoc_url=None)


async def served_replies() -> Replies:
    """The running service's reply path (service.py's Chat.replies); async, so FastAPI calls it on the loop."""
    return bentoml.get_current_service().replies


Served = Annotated[Replies, Depends(served_replies)]


class CompletionEvents:
    """A streamed completion: chat.completion.chunk events, a finish chunk (and usage if asked), then [DONE]."""

    def __init__(self, turn: dict[str, str], model: str, created: int, include_usage: bool):
        self.turn, self.model, self.created, self.include_usage = turn, model, created, include_usage

    def _event(self, delta: dict, reason: str | None = None, usage: dict | None = None) -> str:
        return f"data: {json.dumps(openai_api.chunk(self.turn, self.model, self.created, delta, reason, usage))}\n\n"

    def start(self) -> str:
        return self._event({"role": "assistant", "content": ""})

    def piece(self, text: str) -> str:
        return self._event({"content": text})

    def done(self, reply: Reply, stopped: bool) -> list[str]:
        usage = [self._event({}, usage=openai_api.usage(reply))] if self.include_usage else []
        return [self._event({}, openai_api.finish_reason(reply, stopped)), *usage, "data: [DONE]\n\n"]


@app.get("/models", include_in_schema=False)
async def models(replies: Served) -> JSONResponse:
    """OpenAI's model list: the one served model, with its version and character."""
    return JSONResponse(openai_api.models_list(replies.identity, cast=replies.cast))


@app.post("/chat/completions", include_in_schema=False)
async def chat_completions(request: Request, replies: Served) -> Response:
    """OpenAI's chat completions on the same engine, limits and conversation log as /chat."""
    created, model = int(time.time()), replies.identity["model_name"]
    try:
        try:
            parsed = openai_api.parse_request(json.loads(await request.body()))
        except ValueError as exc:  # not JSON
            raise openai_api.OpenAIError(400, f"the body is not valid JSON: {exc}") from None
        prompt, stops = openai_api.to_prompt(parsed, model, replies.cast)
        try:
            replies.speaker(prompt.character)
        except UnknownCharacter as exc:
            raise openai_api.OpenAIError(404, str(exc), "model", "model_not_found") from None
        model = parsed.model  # MODEL, or MODEL/Character of a cast model: echoed as asked
        try:
            turn = await replies.turns.open_turn(parsed.conversation_id)
        except NotYours as exc:
            raise openai_api.OpenAIError(409, str(exc), "conversation_id") from None
        if parsed.stream:
            usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            events = CompletionEvents(turn, model, created, usage)
            sse = replies.stream(ENDPOINT, prompt, turn, events, stops)
            try:  # the first event before the 200 goes out: a refusal until then keeps its own status and body
                first = await anext(sse)
            except EngineBusy as exc:
                raise openai_api.OpenAIError(503, str(exc), None, "overloaded", {"Retry-After": "1"}) from exc
            return StreamingResponse(_after(first, sse), media_type="text/event-stream")
        reply = await _reply(replies, prompt, turn, stops)
    except openai_api.OpenAIError as exc:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
    except EngineError as exc:  # logged by the reply path as an "error" turn
        logger.error("%s failed: %s", ENDPOINT, exc)
        return JSONResponse(openai_api.error_body(500, f"generation failed: {exc}", None, "engine_error"), 500)
    reason = openai_api.finish_reason(reply, False)
    return JSONResponse(openai_api.completion(turn, model, created, reply.reply, reason, reply))


async def _after(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    """The stream's first event, then the rest."""
    yield first
    async for event in rest:
        yield event


async def _reply(replies: Replies, prompt, turn: dict[str, str], stops: Sequence[str]) -> Reply:
    """The reply path's Reply; a full engine queue is OpenAI's 503 with Retry-After."""
    try:
        return await replies.reply(ENDPOINT, prompt, turn, stops)
    except EngineBusy as exc:
        raise openai_api.OpenAIError(503, str(exc), None, "overloaded", {"Retry-After": "1"}) from exc
