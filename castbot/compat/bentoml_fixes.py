"""Workarounds for BentoML behaviour, each in one named function with the version and the upstream behaviour.

tests/compat/test_bentoml_fixes.py checks that each upstream behaviour is still there: when BentoML changes, that
test fails
and the workaround can go.
"""

import json

# Each event of a text/event-stream response, as OpenAPI 3.0 describes one (`schema` covers a single event).
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string", "description": "start, done, or absent for a piece of the reply"},
    "data": {"type": "string", "description": "JSON: the model's identity (start), {'text': piece}, or the "
                                              "whole ChatReply (done)"}}}


def fix_openapi(spec: dict) -> dict:
    """The spec BentoML publishes, corrected where its responses do not match it.

    BentoML 1.4.39-1.4.40 documents the 400 body's `detail` as a string but sends pydantic's list of errors,
    documents a streamed response as one string, not as events, and leaves request bodies optional though every
    API needs one: generated clients and schemathesis reject all three.
    """
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schema = spec.get("components", {}).get("schemas", {}).get(name)
        if schema and "detail" in schema.get("properties", {}):
            schema["properties"]["detail"] = {"title": "Error Detail", "oneOf": [
                {"type": "string"}, {"type": "array", "items": {"type": "object"}}]}
    for path in spec.get("paths", {}).values():
        for operation in path.values():
            if not isinstance(operation, dict):
                continue
            if "requestBody" in operation:
                operation["requestBody"]["required"] = True
            content = operation.get("responses", {}).get("200", {}).get("content", {})
            if "text/event-stream" in content:
                content["text/event-stream"]["schema"] = SSE_EVENT
    return spec


class FixedOpenAPI:
    """ASGI middleware that serves /docs.json through fix_openapi (one request per client, not per API call)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/docs.json":
            return await self.app(scope, receive, send)
        start: dict = {}
        chunks: list[bytes] = []

        async def rewrite(message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if start.get("status") == 200:
                body = json.dumps(fix_openapi(json.loads(body))).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


class UnwrappedErrors:
    """ASGI middleware: a 4xx JSON body that BentoML wrapped in a one-element list is sent as the object itself.

    BentoML 1.4.39 (_bentoml_impl/server/app.py, api_endpoint_wrapper) builds the body of a 4xx BentoMLException as
    `({"error": str(exc)},)`, a stray trailing comma, so clients get `[{"error": ...}]` where its own spec
    documents `{"error": ...}`. Only non-2xx responses are read here, so replies and streams pass untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start: dict = {}
        chunks: list[bytes] = []

        async def unwrap(message) -> None:
            if message["type"] == "http.response.start":
                if not 400 <= message["status"] < 500:
                    return await send(message)
                start.update(message)
                return
            if not start:
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
                body = json.dumps(data[0]).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, unwrap)


class CorkDispatch:
    """`await dispatch(item)`: callback's result for that item, batched with others by BentoML's CorkDispatcher."""

    def __init__(self, dispatcher, wrapped):
        self._dispatcher, self._wrapped = dispatcher, wrapped

    async def __call__(self, item):
        return await self._wrapped(item)

    @property
    def controller_task(self):
        """The dispatcher's loop task once the first item arrived; None before."""
        return self._dispatcher._controller

    def shutdown(self) -> None:
        self._dispatcher.shutdown()


def cork_dispatcher(callback, max_batch_size: int, max_latency_s: float, fallback) -> CorkDispatch:
    """BentoML's adaptive batching (the CorkDispatcher behind `@bentoml.api(batchable=True)`) around an async batch
    callback (a sequence of items -> a sequence of results), for use inside the service's own process. An item
    that BentoML drops after max_latency (or whose caller was cancelled) is answered with fallback().

    BentoML 1.4.39 exposes the algorithm only through batchable APIs, which the service could reach only by calling
    itself over HTTP (a client session kept per service and a context variable to skip admission). Its class is
    internal (bentoml._internal.marshal.dispatcher): tests/compat/test_bentoml_fixes.py fails when its constructor or
    its `_controller` attribute change."""
    from bentoml._internal.marshal.dispatcher import CorkDispatcher

    dispatcher = CorkDispatcher(max_latency_in_ms=int(max_latency_s * 1000), max_batch_size=max_batch_size,
                                fallback=fallback, get_batch_size=lambda item: 1)
    return CorkDispatch(dispatcher, dispatcher(callback))
