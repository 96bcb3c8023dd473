"""The OpenAI-compatible API of the served Bento (/v1/models, /v1/chat/completions), driven through the official
openai client: the same replies and log as /chat, streaming, stop strings, and refusals in OpenAI's error shape."""

import asyncio
import json

import httpx
import pytest

from tests.conftest import CHARACTER
from tests.serve.conftest import BIG, BURSTS, SERVER_LIMITS, chat, logged_turns

pytestmark = pytest.mark.service


@pytest.fixture(scope="session")
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="any", max_retries=0, timeout=60)


def test_openai_models_lists_the_served_model(openai_client, trained):
    [model] = openai_client.models.list().data
    assert model.id == "serve-bot" and model.owned_by == "castbot"
    assert (model.model_extra["version"], model.model_extra["character"]) == (trained["version"], CHARACTER)


def test_openai_chat_completion_is_the_chat_reply_and_is_logged(server, openai_client):
    message = "Is the rocket ready for the openai client?"
    completion = openai_client.chat.completions.create(
        model="serve-bot", messages=[{"role": "user", "content": message}], temperature=0, max_tokens=8, seed=7,
        user="someone", presence_penalty=0)
    [choice] = completion.choices
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length") and completion.model == "serve-bot"
    direct = chat(server, message=message, temperature=0, max_new_tokens=8).json()
    assert choice.message.content == direct["reply"]  # the same engine and prompt as /chat
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (direct["prompt_tokens"], direct["new_tokens"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    row = logged_turns(server).set_index("turn_id").loc[completion.id.removeprefix("chatcmpl-")]
    assert (row.endpoint, row.message, row.reply) == ("v1/chat/completions", message, choice.message.content)


def test_openai_stream_joins_to_the_greedy_reply(server, openai_client):
    body = {"model": "serve-bot", "messages": [{"role": "user", "content": "Is the rocket ready?"}],
            "temperature": 0, "max_tokens": 12}
    whole = openai_client.chat.completions.create(**body).choices[0]
    chunks = list(openai_client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2 and "".join(pieces) == whole.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].usage.completion_tokens >= 1 and not chunks[-1].choices
    # on the wire: text/event-stream, chat.completion.chunk events, ended by [DONE]
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert {json.loads(line.removeprefix("data: "))["object"] for line in lines[:-1]} == {"chat.completion.chunk"}
    turn_id = json.loads(lines[0].removeprefix("data: "))["id"].removeprefix("chatcmpl-")
    assert logged_turns(server).set_index("turn_id").loc[turn_id].endpoint == "v1/chat/completions"


def test_openai_conversation_sees_system_history_and_stop(server, openai_client):
    messages = [{"role": "system", "content": "Science is never simple."},
                {"role": "user", "content": "The rocket needs fuel."},
                {"role": "assistant", "content": "Science is simple."},
                {"role": "user", "content": "Is the rocket ready?"}]
    answer = openai_client.chat.completions.create(model="serve-bot", messages=messages, temperature=0, max_tokens=8)
    direct = chat(server, history=[{"speaker": "system", "text": "Science is never simple."},
                                   {"speaker": "user", "text": "The rocket needs fuel."},
                                   {"speaker": "bot", "text": "Science is simple."}],
                  message="Is the rocket ready?", temperature=0, max_new_tokens=8).json()
    assert answer.choices[0].message.content == direct["reply"]  # the turns /chat would see, system first
    assert answer.usage.prompt_tokens == direct["prompt_tokens"]
    alone = openai_client.chat.completions.create(model="serve-bot", messages=messages[-1:], temperature=0,
                                                  max_tokens=8)
    assert alone.usage.prompt_tokens < answer.usage.prompt_tokens
    row = logged_turns(server).set_index("turn_id").loc[answer.id.removeprefix("chatcmpl-")]
    assert (row.message, row.history_turns) == ("Is the rocket ready?", 3)
    # a stop string cuts the reply before it, streamed or not, and the log keeps the cut reply
    reply = direct["reply"]
    stop = reply.split()[1] if len(reply.split()) > 1 else reply[1:]
    cut = openai_client.chat.completions.create(model="serve-bot", messages=messages, temperature=0, max_tokens=8,
                                                stop=[stop])
    assert cut.choices[0].message.content == reply[: reply.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = openai_client.chat.completions.create(model="serve-bot", messages=messages, temperature=0,
                                                     max_tokens=8, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply[: reply.index(stop)]


@pytest.mark.parametrize("extra, status, param", [
    ({"n": 2}, 400, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "tools"),
    ({"logprobs": True}, 400, "logprobs"),
    ({"temperature": 2.5}, 400, "temperature"),
    ({"seed": 1, "temperature": 0.8}, 400, "seed"),
    ({"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"mood": "happy"}, 400, "mood"),
    ({"model": "gpt-4o"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400,
     "messages[1].role"),
    ({"messages": [{"role": "user", "content": BIG}]}, 400, "messages[0].content"),
    ({"max_tokens": 0}, 400, "max_tokens"),
])
def test_openai_refusals_name_the_parameter(openai_client, extra, status, param):
    import openai

    with pytest.raises(openai.APIStatusError) as refused:  # extra_body: sent as is, past the client's own checks
        openai_client.chat.completions.create(model="serve-bot", messages=[{"role": "user", "content": "hi"}],
                                              extra_body=extra)
    error = refused.value
    assert error.status_code == status and error.body["param"] == param, error.body
    assert error.body["type"] == "invalid_request_error" and param.split("[")[0] in error.body["message"]


def test_openai_errors_at_the_door_are_in_openais_shape(server):
    big = json.dumps({"model": "serve-bot", "messages": [{"role": "user", "content": "y" * 9000}]})
    resp = httpx.post(f"{server}/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large", resp.text
    resp = httpx.post(f"{server}/v1/chat/completions", content=b"hi", headers={"content-type": "text/plain"})
    assert resp.status_code == 415 and resp.json()["error"]["param"] == "Content-Type"
    resp = httpx.post(f"{server}/v1/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]


def test_openai_overload_is_a_503_with_retry_after_in_openais_shape(server):
    async def run(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:
            body = {"model": "serve-bot", "messages": [{"role": "user", "content": "Crowded?"}],
                    "max_tokens": SERVER_LIMITS["max_new_tokens"]}
            return await asyncio.gather(*(client.post(f"{server}/v1/chat/completions", json=body) for _ in range(n)))

    for factor in BURSTS:
        responses = asyncio.run(run(factor * SERVER_LIMITS["max_concurrency"]))
        if any(r.status_code == 503 for r in responses):
            break
    assert {r.status_code for r in responses} == {200, 503}, {r.status_code for r in responses}
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded" and "over capacity" in refused.json()["error"]["message"]

