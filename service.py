"""The chat service: a castbot model from the BentoML store behind /chat, /generate and a web page.

    bentoml serve castbot-chat:latest                 # a Bento built by `python -m tasks.release.bento`
    bentoml serve service:Chat                        # from the checkout: the newest imported model
    bentoml serve service:Chat --arg model=demo-bot:v3

Limits, capacity and the engine come from CASTBOT_SERVE_* variables (castbot/serve/schemas.py: ServeLimits):
CASTBOT_SERVE_ENGINE=auto (default: openvino on CPU when the Bento holds its OpenVINO export, else continuous),
continuous (transformers' continuous batching, castbot/serve/engines/continuous.py), adaptive (queued requests in
static batches, castbot/serve/engines/adaptive.py) or openvino (OpenVINO GenAI's continuous batching on CPU,
castbot/serve/engines/openvino.py). The service reads the same for all.

This module only wires: every route answers through one reply path (castbot/serve/replies.py), which logs each
turn (castbot/serve/turn_log.py) and counts it (castbot/serve/metrics.py); admission.py guards the door and
openai_routes.py serves OpenAI's protocol at /v1. Who may call and how often (CASTBOT_API_KEYS, CASTBOT_RATE_LIMIT)
is castbot/serve/access.py, checked at the door by admission.py.
"""

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator
from http import HTTPStatus
from pathlib import Path

import bentoml
from bentoml.exceptions import BentoMLException, NotFound, ServiceUnavailable
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from castbot.chatlog.store import ChatLogUnavailable
from castbot.compat.bentoml_fixes import FixedOpenAPI, UnwrappedErrors
from castbot.model.bot import Bot
from castbot.model.folder import pick_device, read_card
from castbot.serve import metrics, openai_routes, scenes
from castbot.serve.access import announce, keys_from_env, rate_limit_from_env
from castbot.serve.admission import Admission
from castbot.serve.engines import EngineBusy, engine_class, resolve_engine
from castbot.serve.replies import ChatEvents, Replies, UnknownCharacter
from castbot.serve.schemas import (
    LIMITS,
    ChatReply,
    ChatRequest,
    Feedback,
    FeedbackSaved,
    GenerateRequest,
    Generation,
    Prompt,
    SceneRequest,
    as_generation,
    chat_prompt,
)
from castbot.serve.turn_log import NotYours, TurnLog, new_turn, open_chatlog

WEB_PAGE = Path(__file__).resolve().parent / "web" / "chat.html"
logger = logging.getLogger("castbot.service")


class BentoArgs(BaseModel):
    """Given at `bentoml build --arg KEY=VALUE`, stored in the Bento and used again when it is served."""

    model: str | None = Field(None, description="BentoML model tag to serve, e.g. demo-bot:v3.")
    gpu: bool = Field(False, description="Request one GPU (bentofile.gpu.yaml sets it).")


def model_tag(args: BentoArgs) -> str:
    """--arg model=TAG, else $CASTBOT_BENTO_MODEL, else the newest castbot model in the BentoML store."""
    tag = args.model or os.environ.get("CASTBOT_BENTO_MODEL")
    if tag:
        return tag
    imported = [m for m in bentoml.models.list() if "mlflow_model" in m.info.labels]
    if not imported:
        raise RuntimeError("no castbot model in the BentoML store: run `python -m tasks.release.bento --model NAME` "
                           "first")
    return str(max(imported, key=lambda m: m.info.creation_time).tag)


ARGS = bentoml.use_arguments(BentoArgs)


async def _web_page(_request) -> FileResponse:
    return FileResponse(WEB_PAGE, media_type="text/html")


web = Starlette(routes=[Route("/", _web_page)])


async def _forget(request) -> JSONResponse:
    """DELETE /conversations/{conversation_id}: the client's own conversation, its turns and ratings; 404 for one
    it does not own (no hint that it exists), 503 while the conversation log is down."""
    conversation_id, turns = request.path_params["conversation_id"], bentoml.get_current_service().turns
    if turns.chatlog is None:
        return JSONResponse({"error": "the conversation log is off (CASTBOT_CHATLOG=off): nothing is kept"}, 404)
    try:
        deleted = await turns.forget(conversation_id)
    except ChatLogUnavailable:
        return JSONResponse({"error": "the conversation log is unavailable; retry later"}, 503, {"Retry-After": "5"})
    if not deleted:
        return JSONResponse({"error": f"conversation {conversation_id} is not in the conversation log"}, 404)
    return JSONResponse({"conversation_id": conversation_id, "deleted_turns": deleted})


conversations = Starlette(routes=[Route("/{conversation_id}", _forget, methods=["DELETE"])])
KEYS, RATE_LIMIT = keys_from_env(), rate_limit_from_env()  # a bad value stops the service at start, naming it


@bentoml.asgi_app(conversations, path="/conversations")
@bentoml.asgi_app(openai_routes.app, path="/v1")
@bentoml.asgi_app(web, path="/ui")
@bentoml.service(
    name="castbot",
    traffic={"timeout": LIMITS.timeout_s},
    resources={"gpu": 1} if ARGS.gpu else {},
    workers=1,
    threads=1,  # all APIs are async; each engine decodes in threads of its own
)
class Chat:
    """A character chatbot: /chat for one turn of a conversation, /generate for batched prompts, /scene for a cast
    model's members speaking in turn."""

    bento_model = bentoml.models.BentoModel(model_tag(ARGS))

    def __init__(self) -> None:
        stored = self.bento_model
        engine_name = resolve_engine(LIMITS.engine, stored.path, pick_device(None, LIMITS.dtype)[0])
        engine = engine_class(engine_name)
        bot = Bot.load(stored.path, torch_threads=LIMITS.torch_threads, dtype=LIMITS.dtype,
                       weights=engine.needs_weights)
        if LIMITS.max_new_tokens >= bot.positions:  # else long requests would fail inside generate
            raise RuntimeError(f"CASTBOT_SERVE_MAX_NEW_TOKENS={LIMITS.max_new_tokens} leaves no room for a prompt: "
                               f"the model holds {bot.positions} positions")
        logger.info("engine %s (CASTBOT_SERVE_ENGINE=%s)", engine_name, LIMITS.engine)
        self.engine = engine.from_limits(bot, LIMITS, metrics.batch_started)
        labels = stored.info.labels
        identity = {"model_name": labels.get("mlflow_model", stored.tag.name),
                    "model_version": labels.get("mlflow_version", stored.tag.version),
                    "character": labels.get("character", "")}
        self.turns = TurnLog(open_chatlog(), identity, engine_name)
        announce(KEYS, RATE_LIMIT)
        card = read_card(stored.path)  # a cast model lists everyone it speaks as; the first answers by default
        cast = card.cast if card and card.cast else (bot.format.character,)
        self.replies = Replies(self.engine, cast, identity, self.turns)  # also openai_routes'

    def __is_ready__(self) -> bool:
        """Ready while the engine runs requests and the conversation log (when on) answers: /readyz is 503 once
        the engine's threads have died or while the log is down, so traffic goes to replicas that keep turns."""
        return self.engine.ready() and self.turns.ready()

    @bentoml.api(route="/generate", input_spec=GenerateRequest)
    async def generate(self, prompts: list[Prompt]) -> list[Generation]:
        """Continue each prompt; concurrent requests decode together, up to max_batch_size at a time."""
        for prompt in prompts:  # a name outside the cast refuses the request before anything runs
            self._speaker(prompt.character)
        replies = [asyncio.ensure_future(self._reply("/generate", prompt, None)) for prompt in prompts]
        try:
            return list(await asyncio.gather(*replies))
        except BaseException:  # one failed (a full queue) or the client left: the others stop too
            for reply in replies:
                reply.cancel()
            raise

    @bentoml.api(route="/chat")
    async def chat(self, request: ChatRequest, /) -> ChatReply:
        """One chat turn: history (oldest first) and message -> the character's reply."""
        character = self._speaker(request.character)
        generation = await self._reply("/chat", chat_prompt(request), request.conversation_id)
        return ChatReply(**generation.model_dump(), **self.replies.identity_of(character))

    @bentoml.api(route="/chat/stream")
    async def chat_stream(self, request: ChatRequest, /) -> AsyncGenerator[str, None]:
        """The /chat reply as server-sent events: `event: start` with the model's identity, `data: {"text": ...}`
        per piece as it is generated, then `event: done` with the whole reply, its token counts and the identity."""
        character = self._speaker(request.character)
        turn = await self._turn(request.conversation_id)
        events = ChatEvents(self.replies.identity_of(character), turn)
        async with contextlib.aclosing(self.replies.stream("/chat/stream", chat_prompt(request), turn, events)) as sse:
            async for event in sse:  # a client that leaves closes it at once: the turn is logged as cancelled
                yield event

    @bentoml.api(route="/scene")
    async def scene(self, request: SceneRequest, /) -> AsyncGenerator[str, None]:
        """Cast members speaking in turn after an opening line, as server-sent events: `event: turn` names each
        line's speaker, `data: {"speaker", "text"}` per piece, `event: said` ends the line, `event: done` the scene
        (castbot/serve/scenes.py)."""
        for name in request.characters:  # anyone outside the cast refuses the scene before it starts
            self._speaker(name)
        first = await self._turn(request.conversation_id or None)
        async with contextlib.aclosing(scenes.play(self.replies, request, first)) as sse:
            async for event in sse:
                yield event

    @bentoml.api(route="/feedback")
    async def feedback(self, request: Feedback, /) -> FeedbackSaved:
        """Rate a reply of your own conversation (+1 or -1, with an optional comment) by the turn_id it carried;
        a turn rated again keeps the latest rating."""
        if self.turns.chatlog is None:
            raise NotFound(f"turn {request.turn_id} is not in the conversation log: the log is off "
                           "(CASTBOT_CHATLOG=off)")
        try:
            found = await self.turns.rate(request.turn_id, request.rating, request.comment or None)
        except ChatLogUnavailable as exc:
            raise ServiceUnavailable("the conversation log cannot store feedback now; retry later") from exc
        if not found:
            raise NotFound(f"turn {request.turn_id} is not in the conversation log")
        return FeedbackSaved(turn_id=request.turn_id, rating=request.rating)

    def _speaker(self, requested: str | None) -> str:
        """The cast member who answers; a name outside the cast is a 404 that names the cast."""
        try:
            return self.replies.speaker(requested)
        except UnknownCharacter as exc:
            raise NotFound(str(exc)) from None

    async def _turn(self, conversation_id: str | None) -> dict[str, str]:
        """The turn's ids; a conversation_id that another client started is a 409 (BentoML 1.4 replaces the message
        of a 403 with "Authorization error": 409, a conflict with the conversation's state, keeps it)."""
        try:
            return await self.turns.open_turn(conversation_id)
        except NotYours as exc:
            raise BentoMLException(str(exc), error_code=HTTPStatus.CONFLICT) from None

    async def _reply(self, endpoint: str, prompt: Prompt, conversation_id: str | None) -> Generation:
        """The shared reply path's answer as the API returns it; a full engine queue is a 503."""
        self._speaker(prompt.character)
        turn = await self._turn(conversation_id) if conversation_id else new_turn(None)
        try:
            return as_generation(await self.replies.reply(endpoint, prompt, turn), turn)
        except EngineBusy as exc:
            raise ServiceUnavailable(str(exc)) from exc


Chat.add_asgi_middleware(Admission, max_concurrency=LIMITS.max_concurrency, max_request_bytes=LIMITS.max_request_bytes,
                         keys=KEYS, rate_limit=RATE_LIMIT)
Chat.add_asgi_middleware(FixedOpenAPI)
Chat.add_asgi_middleware(UnwrappedErrors)
