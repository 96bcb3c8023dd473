"""The chat service: a castbot model from the BentoML store behind /chat, /generate and a web page.

    bentoml serve castbot-chat:latest                 # a Bento built by `python -m tasks.release.bento`
    bentoml serve service:Chat                        # from the checkout: the newest imported model
    bentoml serve service:Chat --arg model=demo-bot:v3

Limits, capacity and the engine come from CASTBOT_SERVE_* variables (castbot/serve/schemas.py: ServeLimits):
CASTBOT_SERVE_ENGINE=auto (default: openvino on CPU when the Bento holds its OpenVINO export, else continuous),
continuous (transformers' continuous batching, castbot/serve/engines/continuous.py), adaptive (queued requests in static
batches, castbot/serve/engines/adaptive.py) or openvino (OpenVINO GenAI's continuous batching on CPU,
castbot/serve/engines/openvino.py). The service reads the same for all.
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from datetime import datetime, timedelta, timezone
from collections.abc import AsyncGenerator
from pathlib import Path

import bentoml
import prometheus_client
from bentoml.exceptions import NotFound, ServiceUnavailable
from pydantic import BaseModel, Field
from fastapi import FastAPI, Request
from starlette.applications import Starlette
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from castbot.compat.bentoml_fixes import FixedOpenAPI, UnwrappedErrors
from castbot.model.bot import Bot, Reply
from castbot.chatlog.store import ChatLog, TurnRecord
from castbot.serve.engines import EngineBusy, EngineError, make_engine, resolve_engine
from castbot.model.folder import pick_device
from castbot.serve import openai_protocol as openai_api
from castbot.serve.schemas import (LIMITS, ChatReply, ChatRequest, Feedback, FeedbackSaved, GenerateRequest, Generation,
                             Prompt, as_generation, chat_prompt, conversation)

WEB_PAGE = Path(__file__).resolve().parent / "web" / "chat.html"
OPENAI_PATHS = frozenset({"/v1/chat/completions"})  # answered in OpenAI's error shape
API_PATHS = frozenset({"/chat", "/chat/stream", "/generate", "/feedback"}) | OPENAI_PATHS
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
        raise RuntimeError("no castbot model in the BentoML store: run `python -m tasks.release.bento --model NAME` first")
    return str(max(imported, key=lambda m: m.info.creation_time).tag)


ARGS = bentoml.use_arguments(BentoArgs)

BATCH_SIZES = prometheus_client.Histogram(
    "castbot_generate_batch_size", "Prompts per model.generate() call, as the model actually ran them.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)

GENERATED_TOKENS = prometheus_client.Counter(
    "castbot_generated_tokens", "Tokens generated, end-of-turn included; rate() gives generated tokens/s.")
FIRST_TOKEN = prometheus_client.Histogram(
    "castbot_time_to_first_token_seconds", "From a /chat/stream request to its first piece of reply.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16))
IN_FLIGHT = prometheus_client.Gauge("castbot_requests_in_flight", "Admitted API requests not yet answered.")
RUNNING_BATCH = prometheus_client.Gauge("castbot_running_batch_size",
                                        "Requests in the batch now decoding (adaptive engine: its generate() call).")


def _batch_started(size: int) -> None:
    """The adaptive engine's hook, per static batch it runs."""
    BATCH_SIZES.observe(size)
    RUNNING_BATCH.set(size)


CHATLOG_ERRORS = prometheus_client.Counter(
    "castbot_chatlog_errors", "Turns or ratings the conversation log failed to store (the reply still went out).")
CHATLOG_WRITE = prometheus_client.Histogram(
    "castbot_chatlog_write_seconds", "Time to commit one turn to the conversation log, before the reply completes.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))


def open_chatlog() -> ChatLog | None:
    """The conversation log from CASTBOT_CHATLOG*, or None when it is off or cannot be opened (logged, counted:
    the service answers without it rather than not at all)."""
    try:
        return ChatLog.from_env()
    except Exception as exc:  # a bad URL, a database down: the error names it without the password
        CHATLOG_ERRORS.inc()
        logger.error("conversation log unavailable, turns are not logged: %s", exc)
        return None


def new_turn(conversation_id: str | None) -> dict[str, str]:
    """Ids of a turn about to be answered: its own, and its conversation's (the client's, or a new one)."""
    return {"turn_id": uuid.uuid4().hex, "conversation_id": conversation_id or uuid.uuid4().hex}


DECODING_STEPS = prometheus_client.Counter(
    "castbot_decoding_steps", "Continuous engine: decoding steps, each advancing every request in the batch by one "
    "token; rate(generated tokens) / rate(steps) is the mean running batch.")


async def _json(scope, send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse(body, status_code=status, headers=headers)(scope, None, send)


async def _refuse(scope, send, status: int, message: str, field: str | None,
                  headers: dict[str, str] | None = None) -> None:
    """A refusal at the door: castbot's {"error", "field"}, or OpenAI's error shape on the /v1 paths."""
    if scope["path"] in OPENAI_PATHS:
        body = openai_api.error_body(status, message, field, {413: "request_too_large", 415: "invalid_content_type",
                                                              503: "overloaded"}.get(status))
    else:
        body = {"error": message, **({"field": field} if field else {})}
    await _json(scope, send, status, body, headers)


def _json_body(scope) -> bool:
    """True when the request declares a JSON body (BentoML answers other types with a 500)."""
    content_type = dict(scope["headers"]).get(b"content-type", b"application/json")
    return content_type.split(b";")[0].strip().lower() == b"application/json"


class Admission:
    """ASGI middleware for the API routes: 415 for a body that is not JSON, 503 beyond max_concurrency in flight,
    413 beyond max_request_bytes. Kept by hand: BentoML 1.4 has no request body limit and answers a non-JSON body
    with a 500 (tests/test_units.py fails when BentoML's traffic settings change), and its traffic.max_concurrency
    answers 503 with no body naming the setting."""

    def __init__(self, app, max_concurrency: int, max_request_bytes: int):
        self.app, self.capacity, self.max_bytes = app, max_concurrency, max_request_bytes
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in API_PATHS:
            return await self.app(scope, receive, send)
        if scope["method"] == "POST" and not _json_body(scope):
            return await _refuse(scope, send, 415, "send the request as JSON (Content-Type: application/json)",
                                 "Content-Type")
        if self.in_flight >= self.capacity:
            return await _refuse(scope, send, 503, f"over capacity: {self.capacity} requests in flight "
                                 "(CASTBOT_SERVE_MAX_CONCURRENCY); retry shortly", None, {"Retry-After": "1"})
        body = await self._read_body(scope, receive)
        if body is None:
            return await _refuse(scope, send, 413, f"request body over {self.max_bytes} bytes "
                                 "(CASTBOT_SERVE_MAX_REQUEST_BYTES)", "body")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        self.in_flight += 1
        IN_FLIGHT.inc()
        try:
            await self.app(scope, replay, send)
        finally:
            self.in_flight -= 1
            IN_FLIGHT.dec()

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None once it exceeds max_bytes (by Content-Length or by counting)."""
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _web_page(_request) -> FileResponse:
    return FileResponse(WEB_PAGE, media_type="text/html")


web = Starlette(routes=[Route("/", _web_page)])
# OpenAI's chat-completions protocol (castbot/serve/openai_protocol.py); its routes are Chat's methods below. Left out of
# /docs.json: OpenAI's own spec describes them, and OpenAPI 3.0 cannot say which valid-looking requests castbot
# refuses (the last message not the user's, a seed while sampling)
openai_app = FastAPI(title="castbot OpenAI-compatible API", openapi_url=None, docs_url=None, redoc_url=None)


@bentoml.asgi_app(openai_app, path="/v1")
@bentoml.asgi_app(web, path="/ui")
@bentoml.service(
    name="castbot",
    traffic={"timeout": LIMITS.timeout_s},
    resources={"gpu": 1} if ARGS.gpu else {},
    workers=1,
    threads=1,  # all APIs are async; each engine decodes in threads of its own
)
class Chat:
    """A character chatbot: /chat for one turn of a conversation, /generate for batched prompts."""

    bento_model = bentoml.models.BentoModel(model_tag(ARGS))

    def __init__(self) -> None:
        stored = self.bento_model
        self.engine_name = resolve_engine(LIMITS.engine, stored.path, pick_device(None, LIMITS.dtype)[0])
        # OpenVINO's engine runs the exported model: torch's copy of the weights would only take memory
        self.bot = Bot.load(stored.path, torch_threads=LIMITS.torch_threads, dtype=LIMITS.dtype,
                            weights=self.engine_name != "openvino")
        if LIMITS.max_new_tokens >= self.bot.positions:  # else long requests would fail inside generate
            raise RuntimeError(f"CASTBOT_SERVE_MAX_NEW_TOKENS={LIMITS.max_new_tokens} leaves no room for a prompt: "
                               f"the model holds {self.bot.positions} positions")
        logging.getLogger("castbot.service").info("engine %s (CASTBOT_SERVE_ENGINE=%s)", self.engine_name,
                                                  LIMITS.engine)
        self.engine = make_engine(self.engine_name, self.bot, LIMITS, on_batch=_batch_started)
        self.chatlog = open_chatlog()
        self.steps_counted = 0
        labels = stored.info.labels
        self.identity = {"model_name": labels.get("mlflow_model", stored.tag.name),
                         "model_version": labels.get("mlflow_version", stored.tag.version),
                         "character": labels.get("character", "")}

    def __is_ready__(self) -> bool:
        """Ready while the engine accepts and runs requests (/readyz answers 503 once its threads have died)."""
        return self.engine.ready()

    @bentoml.api(route="/generate", input_spec=GenerateRequest)
    async def generate(self, prompts: list[Prompt]) -> list[Generation]:
        """Continue each prompt; concurrent requests decode together, up to max_batch_size at a time."""
        return list(await asyncio.gather(*(self._reply("/generate", prompt, new_turn(None)) for prompt in prompts)))

    @bentoml.api(route="/chat")
    async def chat(self, request: ChatRequest, /) -> ChatReply:
        """One chat turn: history (oldest first) and message -> the character's reply."""
        generation = await self._reply("/chat", chat_prompt(request), new_turn(request.conversation_id))
        return ChatReply(**generation.model_dump(), **self.identity)

    @bentoml.api(route="/chat/stream")
    async def chat_stream(self, request: ChatRequest, /) -> AsyncGenerator[str, None]:
        """The /chat reply as server-sent events: `event: start` with the model's identity, `data: {"text": ...}`
        per piece as it is generated, then `event: done` with the whole reply, its token counts and the identity."""
        started, first_piece_at, prompt = time.perf_counter(), None, chat_prompt(request)
        turn = new_turn(request.conversation_id)
        stream = self.engine.stream(conversation(prompt, self.bot.format.character), **prompt.decoding())
        failed = True
        try:
            yield f"event: start\ndata: {json.dumps(self.identity)}\n\n"
            async with contextlib.aclosing(stream):  # closed early (a client that left): the engine stops it
                async for piece in stream:
                    first_piece_at = first_piece_at or time.perf_counter()
                    yield f"data: {json.dumps({'text': piece})}\n\n"
            failed = False
        except (GeneratorExit, asyncio.CancelledError):  # the client left: stream.reply is "cancelled"
            failed = False
            raise
        finally:
            reply = dataclasses.replace(stream.reply, finish_reason="error") if failed else stream.reply
            await self._finished("/chat/stream", prompt, reply, started, first_piece_at, turn)
        final = ChatReply(**as_generation(reply, turn).model_dump(), **self.identity)
        yield f"event: done\ndata: {final.model_dump_json()}\n\n"

    @bentoml.api(route="/feedback")
    async def feedback(self, request: Feedback, /) -> FeedbackSaved:
        """Rate a served turn (+1 or -1, with an optional comment) by the turn_id its reply carried."""
        if self.chatlog is None:
            raise NotFound(f"turn {request.turn_id} is not in the conversation log: the log is off "
                           "(CASTBOT_CHATLOG=off) or unavailable")
        try:
            found = await asyncio.to_thread(self.chatlog.add_feedback, request.turn_id, request.rating,
                                            request.comment or None)
        except Exception as exc:
            CHATLOG_ERRORS.inc()
            logger.error("feedback not stored: %s", type(exc).__name__)
            raise ServiceUnavailable("the conversation log cannot store feedback now; retry later") from exc
        if not found:
            raise NotFound(f"turn {request.turn_id} is not in the conversation log")
        return FeedbackSaved(turn_id=request.turn_id, rating=request.rating)

    @openai_app.get("/models", include_in_schema=False)
    async def openai_models(self) -> JSONResponse:
        """OpenAI's model list: the one served model, with its version and character."""
        return JSONResponse(openai_api.models_list(self.identity))

    @openai_app.post("/chat/completions", include_in_schema=False)
    async def openai_chat(self, request: Request) -> Response:
        """OpenAI's chat completions on the same engine, limits and conversation log as /chat."""
        created = int(time.time())
        try:
            try:
                parsed = openai_api.parse_request(json.loads(await request.body()))
            except ValueError as exc:  # not JSON
                raise openai_api.OpenAIError(400, f"the body is not valid JSON: {exc}") from None
            prompt, stops = openai_api.to_prompt(parsed, self.identity["model_name"])
            turn = new_turn(parsed.conversation_id)
            if parsed.stream:
                return StreamingResponse(self._openai_stream(prompt, stops, turn, created, parsed),
                                         media_type="text/event-stream")
            reply = await self._openai_reply(prompt, stops, turn)
        except openai_api.OpenAIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        except EngineError as exc:  # logged by _finished as an "error" turn
            logger.error("/v1/chat/completions failed: %s", exc)
            return JSONResponse(openai_api.error_body(500, f"generation failed: {exc}", None, "engine_error"), 500)
        reason = openai_api.finish_reason(reply, False)
        return JSONResponse(openai_api.completion(turn, self.identity["model_name"], created, reply.reply, reason,
                                                  reply))

    async def _openai_reply(self, prompt: Prompt, stops: list[str], turn: dict[str, str]) -> Reply:
        """One reply through the engine, cut at the first stop string (the log records the cut reply)."""
        started = time.perf_counter()
        reply = Reply("", 0, 0, "error")
        try:
            reply = await self.engine.reply(conversation(prompt, self.bot.format.character), **prompt.decoding())
            text, stopped = openai_api.cut_at_stop(reply.reply, stops)
            if stopped:
                reply = dataclasses.replace(reply, reply=text, finish_reason="stop")
        except asyncio.CancelledError:
            reply = Reply("", 0, 0, "cancelled")
            raise
        except EngineBusy as exc:
            raise openai_api.OpenAIError(503, str(exc), None, "overloaded", {"Retry-After": "1"}) from exc
        finally:
            await self._finished("/v1/chat/completions", prompt, reply, started, None, turn)
        return reply

    async def _openai_stream(self, prompt: Prompt, stops: list[str], turn: dict[str, str], created: int,
                             request) -> AsyncGenerator[str, None]:
        """The reply as chat.completion.chunk events, then a finish chunk (and usage if asked), then [DONE]."""
        def event(body: dict) -> str:
            return f"data: {json.dumps(body)}\n\n"

        model, started, first_piece_at = self.identity["model_name"], time.perf_counter(), None
        stream = self.engine.stream(conversation(prompt, self.bot.format.character), **prompt.decoding())
        cutter, failed = openai_api.StopCutter(stops), True
        try:
            yield event(openai_api.chunk(turn, model, created, {"role": "assistant", "content": ""}))
            async with contextlib.aclosing(stream):  # leaving it early (a stop string, a client gone) cancels
                async for piece in stream:
                    first_piece_at = first_piece_at or time.perf_counter()
                    if text := cutter.feed(piece if cutter.text else piece.lstrip()):
                        yield event(openai_api.chunk(turn, model, created, {"content": text}))
                    if cutter.stopped:
                        break
            if rest := cutter.flush().rstrip():
                yield event(openai_api.chunk(turn, model, created, {"content": rest}))
            failed = False
        except (GeneratorExit, asyncio.CancelledError):
            failed = False
            raise
        finally:
            reply = stream.reply
            if cutter.stopped:
                reply = dataclasses.replace(reply, reply=openai_api.cut_at_stop(reply.reply or cutter.text, stops)[0],
                                            finish_reason="stop")
            elif failed:
                reply = dataclasses.replace(reply, finish_reason="error")
            await self._finished("/v1/chat/completions", prompt, reply, started, first_piece_at, turn)
        reason = openai_api.finish_reason(reply, cutter.stopped)
        yield event(openai_api.chunk(turn, model, created, {}, reason))
        if request.stream_options and request.stream_options.include_usage:
            yield event(openai_api.chunk(turn, model, created, {}, usage_counts=openai_api.usage(reply)))
        yield "data: [DONE]\n\n"

    async def _reply(self, endpoint: str, prompt: Prompt, turn: dict[str, str]) -> Generation:
        """One reply from the engine, passed through _finished whatever its end; EngineBusy becomes a 503."""
        started = time.perf_counter()
        reply = Reply("", 0, 0, "error")
        try:
            reply = await self.engine.reply(conversation(prompt, self.bot.format.character), **prompt.decoding())
        except asyncio.CancelledError:  # the client left (or the request timed out)
            reply = Reply("", 0, 0, "cancelled")
            raise
        except EngineBusy as exc:
            raise ServiceUnavailable(str(exc)) from exc
        finally:
            await self._finished(endpoint, prompt, reply, started, None, turn)
        return as_generation(reply, turn)

    async def _finished(self, endpoint: str, prompt: Prompt, reply: Reply, started: float,
                        first_piece_at: float | None, turn: dict[str, str]) -> None:
        """Every finished turn of /chat, /chat/stream, /generate and /v1/chat/completions passes here once, whatever its finish_reason;
        started and first_piece_at are time.perf_counter() readings. The turn is committed to the conversation
        log before the reply goes out (so an acknowledged reply survives a crash), in a worker thread; a turn the
        client abandoned is logged without waiting. Metrics are updated here, not read on scrape (BentoML's
        multiprocess metrics cannot read a gauge on scrape)."""
        if self.chatlog is not None:
            record = self._record(endpoint, prompt, reply, started, first_piece_at, turn)
            if reply.finish_reason == "cancelled":
                asyncio.get_running_loop().run_in_executor(None, self._write, record)
            else:
                await asyncio.to_thread(self._write, record)
        GENERATED_TOKENS.inc(reply.new_tokens)
        if first_piece_at is not None:
            FIRST_TOKEN.observe(first_piece_at - started)
        RUNNING_BATCH.set(self.engine.running())
        steps = self.engine.steps()
        DECODING_STEPS.inc(steps - self.steps_counted)
        self.steps_counted = steps

    def _record(self, endpoint: str, prompt: Prompt, reply: Reply, started: float, first_piece_at: float | None,
                turn: dict[str, str]) -> TurnRecord:
        """The conversation log's row for a finished turn."""
        now = time.perf_counter()
        return TurnRecord(
            **turn, time=datetime.now(timezone.utc) - timedelta(seconds=now - started), endpoint=endpoint.lstrip("/"),
            message=prompt.named_turns()[-1][1], reply=reply.reply, history_turns=len(prompt.turns) - 1,
            **self.identity, engine=self.engine_name, prompt_tokens=reply.prompt_tokens, new_tokens=reply.new_tokens,
            latency_s=now - started, ttft_s=None if first_piece_at is None else first_piece_at - started,
            finish_reason=reply.finish_reason)

    def _write(self, record: TurnRecord) -> None:
        """Commit one turn; a failure is counted and logged (without the user's words), never raised."""
        started = time.perf_counter()
        try:
            self.chatlog.record(record)
        except Exception as exc:
            CHATLOG_ERRORS.inc()
            logger.error("turn %s not logged: %s", record.turn_id, type(exc).__name__)
            return
        CHATLOG_WRITE.observe(time.perf_counter() - started)


Chat.add_asgi_middleware(Admission, max_concurrency=LIMITS.max_concurrency, max_request_bytes=LIMITS.max_request_bytes)
Chat.add_asgi_middleware(FixedOpenAPI)
Chat.add_asgi_middleware(UnwrappedErrors)
