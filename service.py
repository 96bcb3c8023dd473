"""The chat service: a castbot model from the BentoML store behind /chat, /generate and a web page.

    bentoml serve castbot-chat:latest                 # a Bento built by `python -m tasks.bento`
    bentoml serve service:Chat                        # from the checkout: the newest imported model
    bentoml serve service:Chat --arg model=demo-bot:v3

Limits, capacity and the engine come from CASTBOT_SERVE_* variables (castbot/serving.py: ServeLimits):
CASTBOT_SERVE_ENGINE=continuous (default: transformers' continuous batching, castbot/engine.py) or adaptive
(BentoML's adaptive batching of /generate, static batches).
"""

import asyncio
import contextlib
import contextvars
import json
import os
import threading
import time
from collections.abc import AsyncGenerator
from pathlib import Path

import bentoml
import prometheus_client
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Route

from castbot.bentoml_compat import FixedOpenAPI, as_model, keep_self_session
from castbot.bot import Bot, Reply
from castbot.engine import ContinuousEngine
from castbot.serving import (LIMITS, ChatReply, ChatRequest, GenerateRequest, Generation, Prompt, as_generation,
                             chat_prompt, conversation, generate_batch, group_by_settings)

WEB_PAGE = Path(__file__).resolve().parent / "web" / "chat.html"
API_PATHS = frozenset({"/chat", "/chat/stream", "/generate"})


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
        raise RuntimeError("no castbot model in the BentoML store: run `python -m tasks.bento --model NAME` first")
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

DECODING_STEPS = prometheus_client.Counter(
    "castbot_decoding_steps", "Continuous engine: decoding steps, each advancing every request in the batch by one "
    "token; rate(generated tokens) / rate(steps) is the mean running batch.")

# set while an outside API request is admitted; the service's own /chat -> /generate call inherits it
_admitted: contextvars.ContextVar[bool] = contextvars.ContextVar("castbot_admitted", default=False)


async def _json(scope, send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse(body, status_code=status, headers=headers)(scope, None, send)


def _json_body(scope) -> bool:
    """True when the request declares a JSON body (BentoML answers other types with a 500)."""
    content_type = dict(scope["headers"]).get(b"content-type", b"application/json")
    return content_type.split(b";")[0].strip().lower() == b"application/json"


class Admission:
    """ASGI middleware for the API routes: 415 for a body that is not JSON, 503 beyond max_concurrency in flight,
    413 beyond max_request_bytes. Kept by hand: BentoML 1.4's traffic.max_concurrency would also count the
    service's own /chat -> /generate calls of the adaptive engine (admitted work that must not be refused), and
    BentoML has no request body limit and answers a non-JSON body with a 500 (tests/test_units.py fails when
    BentoML's traffic settings change)."""

    def __init__(self, app, max_concurrency: int, max_request_bytes: int):
        self.app, self.capacity, self.max_bytes = app, max_concurrency, max_request_bytes
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in API_PATHS:
            return await self.app(scope, receive, send)
        if scope["method"] == "POST" and not _json_body(scope):
            return await _json(scope, send, 415, {"error": "send the request as JSON (Content-Type: application/json)",
                                                  "field": "Content-Type"})
        if not _admitted.get() and self.in_flight >= self.capacity:
            return await _json(scope, send, 503, {"error": f"over capacity: {self.capacity} requests in flight "
                                                    "(CASTBOT_SERVE_MAX_CONCURRENCY); retry shortly"},
                               {"Retry-After": "1"})
        body = await self._read_body(scope, receive)
        if body is None:
            return await _json(scope, send, 413, {"error": f"request body over {self.max_bytes} bytes "
                                                    "(CASTBOT_SERVE_MAX_REQUEST_BYTES)", "field": "body"})
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        if _admitted.get():
            return await self.app(scope, replay, send)
        self.in_flight += 1
        IN_FLIGHT.inc()
        token = _admitted.set(True)
        try:
            await self.app(scope, replay, send)
        finally:
            _admitted.reset(token)
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


def _advance(pieces):
    """(next piece, None), or (None, the generator's return value) at its end: StopIteration cannot cross
    asyncio.to_thread's future."""
    try:
        return next(pieces), None
    except StopIteration as end:
        return None, end.value


async def _web_page(_request) -> FileResponse:
    return FileResponse(WEB_PAGE, media_type="text/html")


web = Starlette(routes=[Route("/", _web_page)])


@bentoml.asgi_app(web, path="/ui")
@bentoml.service(
    name="castbot",
    traffic={"timeout": LIMITS.timeout_s},
    resources={"gpu": 1} if ARGS.gpu else {},
    workers=1,
    threads=1,  # adaptive engine: one generate() at a time; the continuous engine decodes in its own thread
)
class Chat:
    """A character chatbot: /chat for one turn of a conversation, /generate for batched prompts."""

    bento_model = bentoml.models.BentoModel(model_tag(ARGS))

    def __init__(self) -> None:
        stored = self.bento_model
        self.bot = Bot.load(stored.path, torch_threads=LIMITS.torch_threads, dtype=LIMITS.dtype)
        if LIMITS.max_new_tokens >= self.bot.positions:  # else long requests would fail inside generate
            raise RuntimeError(f"CASTBOT_SERVE_MAX_NEW_TOKENS={LIMITS.max_new_tokens} leaves no room for a prompt: "
                               f"the model holds {self.bot.positions} positions")
        self.engine = (ContinuousEngine(self.bot, LIMITS.max_batch_size, LIMITS.max_new_tokens)
                       if LIMITS.engine == "continuous" else None)
        self.steps_counted = 0
        labels = stored.info.labels
        self.identity = {"model_name": labels.get("mlflow_model", stored.tag.name),
                         "model_version": labels.get("mlflow_version", stored.tag.version),
                         "character": labels.get("character", "")}

    def __is_ready__(self) -> bool:
        return self.bot is not None

    if LIMITS.engine == "continuous":
        @bentoml.api(route="/generate", input_spec=GenerateRequest)
        async def generate(self, prompts: list[Prompt]) -> list[Generation]:
            """Continue each prompt; each joins the running batch at the next decoding step."""
            replies = await asyncio.gather(*(self._reply(prompt) for prompt in prompts))
            return [as_generation(reply) for reply in replies]
    else:
        @bentoml.api(route="/generate", input_spec=GenerateRequest, batchable=LIMITS.batching,
                     max_batch_size=LIMITS.max_batch_size, max_latency_ms=LIMITS.max_latency_ms)
        def generate(self, prompts: list[Prompt]) -> list[Generation]:
            """Continue each prompt; concurrent requests are merged into batches of up to max_batch_size."""
            results: list[Generation | None] = [None] * len(prompts)
            for indices in group_by_settings(prompts).values():
                BATCH_SIZES.observe(len(indices))
                RUNNING_BATCH.set(len(indices))
                for i, generation in zip(indices, generate_batch(self.bot, [prompts[i] for i in indices])):
                    results[i] = generation
                    self._count(generation)
                RUNNING_BATCH.set(0)
            return results

    async def _reply(self, prompt: Prompt) -> Reply:
        """One reply from the continuous engine."""
        reply = await self.engine.reply(conversation(prompt, self.bot.format.character), **prompt.decoding())
        self._count(reply)
        return reply

    def _count(self, reply: Reply | Generation) -> None:
        """Metrics at the end of a reply (BentoML's multiprocess metrics cannot read a gauge on scrape)."""
        GENERATED_TOKENS.inc(reply.new_tokens)
        if self.engine:
            RUNNING_BATCH.set(self.engine.running())
            steps = self.engine.steps()
            DECODING_STEPS.inc(steps - self.steps_counted)
            self.steps_counted = steps

    async def _pieces(self, prompt: Prompt) -> AsyncGenerator[str | Reply, None]:
        """The reply's text piece by piece, then the whole Reply; leaving early stops its generation."""
        turns = conversation(prompt, self.bot.format.character)
        if self.engine:
            async with contextlib.aclosing(self.engine.stream(turns, **prompt.decoding())) as items:
                async for item in items:  # closing it cancels the request in the engine
                    yield item
            return
        stop = threading.Event()
        pieces = self.bot.stream(turns, stop=stop, **prompt.decoding())
        try:
            while True:  # the model runs in Bot.stream's thread; waiting for each piece must not block the loop
                piece, reply = await asyncio.to_thread(_advance, pieces)
                yield piece if reply is None else reply
                if reply is not None:
                    return
        finally:
            stop.set()  # a client that left (or a timeout) stops generation at the next token

    @bentoml.api(route="/chat")
    async def chat(self, request: ChatRequest, /) -> ChatReply:
        """One chat turn: history (oldest first) and message -> the character's reply."""
        prompt = chat_prompt(request)
        if self.engine:
            generation = as_generation(await self._reply(prompt))
        else:  # through the service's own /generate endpoint, so concurrent chats share its batches
            keep_self_session(self)  # the proxy exists from the first to_async call on; a no-op once it is patched
            [generation] = await self.to_async.generate(prompts=[prompt])
            generation = as_model(generation, Generation)
        return ChatReply(**generation.model_dump(), **self.identity)

    @bentoml.api(route="/chat/stream")
    async def chat_stream(self, request: ChatRequest, /) -> AsyncGenerator[str, None]:
        """The /chat reply as server-sent events: `event: start` with the model's identity, `data: {"text": ...}`
        per piece as it is generated, then `event: done` with the whole reply, its token counts and the identity."""
        started = time.perf_counter()
        yield f"event: start\ndata: {json.dumps(self.identity)}\n\n"
        async with contextlib.aclosing(self._pieces(chat_prompt(request))) as items:  # closed: a client that left
            async for item in items:                                                  # stops its generation
                if isinstance(item, Reply):
                    reply = item
                    continue
                if started is not None:
                    FIRST_TOKEN.observe(time.perf_counter() - started)
                    started = None
                yield f"data: {json.dumps({'text': item})}\n\n"
        self._count(reply)
        final = ChatReply(**as_generation(reply).model_dump(), **self.identity)
        yield f"event: done\ndata: {final.model_dump_json()}\n\n"


Chat.add_asgi_middleware(Admission, max_concurrency=LIMITS.max_concurrency, max_request_bytes=LIMITS.max_request_bytes)
Chat.add_asgi_middleware(FixedOpenAPI)
