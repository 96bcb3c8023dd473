"""Admission at the door of the API routes (ASGI middleware), in this order: 401 without a valid API key (when
CASTBOT_API_KEYS is set), 415 for a body that is not JSON, 413 beyond max_request_bytes (the rest of the body is
read and dropped first, so every client sees the 413), 503 beyond max_concurrency prompts in flight, 429 beyond
the client's rate limit. Refusals are castbot's {"error", "field"}, or OpenAI's error shape on /v1.
A /generate of N prompts counts N against the rate limit and the capacity; a /scene of T lines counts T against
the rate limit and 1 against the capacity.

Kept by hand: BentoML 1.4 has no request body limit and answers a non-JSON body with a 500
(tests/compat/test_bentoml_fixes.py fails when BentoML's traffic settings change), and its traffic.max_concurrency
answers 503 with no body naming the setting.
"""

import asyncio
import json
import time

from starlette.responses import JSONResponse

from castbot.serve import openai_protocol as openai_api
from castbot.serve.access import CLIENT, RateLimit, RateLimiter, client_of, retry_after
from castbot.serve.metrics import IN_FLIGHT
from castbot.serve.schemas import SceneRequest

OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/models"})  # answered in OpenAI's error shape
API_PATHS = frozenset({"/chat", "/chat/stream", "/generate", "/scene", "/feedback"}) | OPENAI_PATHS
OWNED_PREFIX = "/conversations/"  # DELETE /conversations/{conversation_id}
OPENAI_CODES = {401: "invalid_api_key", 413: "request_too_large", 415: "invalid_content_type",
                429: "rate_limit_exceeded", 503: "overloaded"}
DRAIN_BYTES, DRAIN_S = 16 * 2**20, 5.0  # what of an oversized body is read and dropped before the 413 goes out


def guarded(path: str) -> bool:
    return path in API_PATHS or path.startswith(OWNED_PREFIX)


async def refuse(scope, send, status: int, message: str, field: str | None,
                 headers: dict[str, str] | None = None) -> None:
    """A refusal at the door: castbot's {"error", "field"}, or OpenAI's error shape on the /v1 paths."""
    if scope["path"] in OPENAI_PATHS:
        body = openai_api.error_body(status, message, field, OPENAI_CODES.get(status))
    else:
        body = {"error": message, **({"field": field} if field else {})}
    await JSONResponse(body, status_code=status, headers=headers)(scope, None, send)


def json_body(scope) -> bool:
    """True when the request declares a JSON body (BentoML answers other types with a 500)."""
    content_type = dict(scope["headers"]).get(b"content-type", b"application/json")
    return content_type.split(b";")[0].strip().lower() == b"application/json"


def costs(path: str, body: bytes) -> tuple[int, int]:
    """What a request costs: (prompts in flight at once, requests of the rate limit). A /generate of N prompts
    (N, N); a /scene of T lines (1, T): its lines are generated one after another; else (1, 1). A malformed body
    costs (1, 1) and is refused later."""
    if path not in ("/generate", "/scene"):
        return 1, 1
    try:
        asked = json.loads(body).get("prompts" if path == "/generate" else "turns")
    except (ValueError, AttributeError):
        return 1, 1
    if path == "/generate":
        return (max(1, len(asked)),) * 2 if isinstance(asked, list) else (1, 1)
    if asked is None:  # the scene's default length
        asked = SceneRequest.model_fields["turns"].default
    return 1, asked if isinstance(asked, int) and 1 <= asked <= 1000 else 1


class Admission:
    """The middleware: Chat.add_asgi_middleware(Admission, max_concurrency=..., max_request_bytes=..., keys=...,
    rate_limit=...). keys maps each API key to its client's name ({}: open, clients are addresses)."""

    def __init__(self, app, max_concurrency: int, max_request_bytes: int, keys: dict[str, str] | None = None,
                 rate_limit: RateLimit | None = None):
        self.app, self.capacity, self.max_bytes = app, max_concurrency, max_request_bytes
        self.keys, self.limiter = keys or {}, RateLimiter(rate_limit) if rate_limit else None
        self.in_flight = 0  # prompts, not requests

    def client(self, scope) -> str | None:
        """The API key's name; the address when the service is open (an IPv6 one by its /64: access.address_client);
        None for a missing or unknown key."""
        if not self.keys:
            from castbot.serve.access import address_client  # (already imported: a lookup)

            return address_client((scope.get("client") or ("unknown",))[0])
        return client_of(self.keys, dict(scope["headers"]).get(b"authorization", b"").decode("latin-1"))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not guarded(scope["path"]):
            return await self.app(scope, receive, send)
        client = self.client(scope)
        if client is None:
            await self._drain(receive, True)
            return await refuse(scope, send, 401, "this service needs an API key: send Authorization: Bearer KEY "
                                "with a key its operator gave you", "Authorization", {"WWW-Authenticate": "Bearer"})
        if scope["method"] == "POST" and not json_body(scope):
            await self._drain(receive, True)
            return await refuse(scope, send, 415, "send the request as JSON (Content-Type: application/json)",
                                "Content-Type")
        body, more = await self._read_body(scope, receive)
        if body is None:
            await self._drain(receive, more)
            return await refuse(scope, send, 413, f"request body over {self.max_bytes} bytes "
                                "(CASTBOT_SERVE_MAX_REQUEST_BYTES)", "body", {"Connection": "close"})
        cost, allowance = costs(scope["path"], body)
        if self.in_flight and self.in_flight + cost > self.capacity:  # before the limit: a 503 costs no allowance
            return await refuse(scope, send, 503, f"over capacity: {self.capacity} prompts in flight "
                                "(CASTBOT_SERVE_MAX_CONCURRENCY); retry shortly", None, {"Retry-After": "1"})
        wait = self.limiter.take(client, allowance) if self.limiter else 0.0
        if wait:
            return await refuse(scope, send, 429, f"rate limit: {self.limiter.limit.requests} requests per "
                                f"{self.limiter.limit.period:g} s for each client (CASTBOT_RATE_LIMIT); retry in "
                                f"{retry_after(wait)} s", None, {"Retry-After": retry_after(wait)})
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        self.in_flight += cost
        IN_FLIGHT.inc()
        token = CLIENT.set(client)
        try:
            await self.app(scope, replay, send)
        finally:
            CLIENT.reset(token)
            self.in_flight -= cost
            IN_FLIGHT.dec()

    async def _read_body(self, scope, receive) -> tuple[bytes | None, bool]:
        """(the whole body, False), or (None, whether more is to come) once it exceeds max_bytes (by
        Content-Length, before reading any, or by counting)."""
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return None, True
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return None, more
            chunks.append(chunk)
            if not more:
                return b"".join(chunks), False

    @staticmethod
    async def _drain(receive, more: bool) -> None:
        """Read and drop what the client is still sending, up to DRAIN_BYTES and DRAIN_S (nginx's lingering close):
        a server that answers and closes while the client sends makes the client's kernel see a reset, not the
        answer."""
        read, deadline = 0, time.monotonic() + DRAIN_S
        while more and read < DRAIN_BYTES:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            more = message.get("more_body", False)
