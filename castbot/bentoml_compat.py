"""Workarounds for BentoML behaviour, each in one named function with the version and the upstream behaviour.

tests/test_units.py checks that each upstream behaviour is still there: when BentoML changes, that test fails
and the workaround can go.
"""

import json

# Each event of a text/event-stream response, as OpenAPI 3.0 describes one (`schema` covers a single event).
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string", "description": "start, done, or absent for a piece of the reply"},
    "data": {"type": "string", "description": "JSON: the model's identity (start), {'text': piece}, or the "
                                              "whole ChatReply (done)"}}}


def nullable_3_0(node):
    """Optional fields as OpenAPI 3.0 says them: `nullable: true`. BentoML 1.4.40 publishes 3.0.2 and flattens
    pydantic's `anyOf: [X, {type: null}]` to X with `default: null`, so the spec refuses the null that castbot's
    optional fields (conversation_id, comment) accept; schemathesis sends null expecting a 400."""
    if isinstance(node, list):
        return [nullable_3_0(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: nullable_3_0(value) for key, value in node.items()}
    options = node.get("anyOf")
    if isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
        [schema] = [option for option in options if option != {"type": "null"}]
        node = {**schema, **{k: v for k, v in node.items() if k != "anyOf"}, "nullable": True}
    elif "default" in node and node["default"] is None and "type" in node:
        node["nullable"] = True
    return node


def fix_openapi(spec: dict) -> dict:
    """The spec BentoML publishes, corrected where its responses do not match it.

    BentoML 1.4.39-1.4.40 documents the 400 body's `detail` as a string but sends pydantic's list of errors,
    documents a streamed response as one string, not as events, leaves request bodies optional though every
    API needs one, and keeps pydantic's 3.1-style optional fields (nullable_3_0): generated clients and
    schemathesis reject all four.
    """
    spec = nullable_3_0(spec)
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schema = spec.get("components", {}).get("schemas", {}).get(name)
        if schema and "detail" in schema.get("properties", {}):
            schema["properties"]["detail"] = {"title": "Error Detail", "oneOf": [
                {"type": "string"}, {"type": "array", "items": {"type": "object"}}]}
    not_found = spec.get("components", {}).get("schemas", {}).get("NotFound")
    if not_found and "oneOf" not in not_found:  # 1.4.40 sends an API's NotFound as a one-item list
        one = {k: v for k, v in not_found.items() if k not in ("title", "description")}
        spec["components"]["schemas"]["NotFound"] = {"title": "NotFound", "description": not_found.get(
            "description", ""), "oneOf": [one, {"type": "array", "items": one}]}
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
