"""Many requests at once: concurrent chats share decoding steps, a burst past max_concurrency is refused fast with
a 503 and the service recovers, and 64 concurrent turns are each logged once and survive a kill -9.

Before any other `bentoml serve` starts (see conftest.py): the first test reads `server`'s own /metrics."""

import asyncio
import json
import os

import httpx
import pytest

from tests.conftest import stop_process_group
from tests.serve.conftest import BOT_CHAT, BURSTS, SERVER_LIMITS, burst, chat, logged_turns, metric, start_server

pytestmark = pytest.mark.service


def test_concurrent_chats_share_decoding_steps(server):
    before = metric(server, "castbot_decoding_steps_total")
    results = burst(server, 16, **BOT_CHAT)
    steps = metric(server, "castbot_decoding_steps_total") - before
    assert [status for status, _, _ in results] == [200] * 16
    tokens = sum(body["new_tokens"] for _, _, body in results)
    # one request at a time would take a step per generated token; together, steps carry many requests each
    assert 0 < steps < tokens / 2, (steps, tokens)


def test_overload_answers_503_fast_and_recovers(server):
    for factor in BURSTS:
        results = burst(server, factor * SERVER_LIMITS["max_concurrency"],
                        max_new_tokens=SERVER_LIMITS["max_new_tokens"])
        if any(status == 503 for status, _, _ in results):
            break
    statuses = {status for status, _, _ in results}
    assert statuses <= {200, 503}, statuses
    refused = [seconds for status, seconds, _ in results if status == 503]
    assert refused, "no request was refused beyond max_concurrency"
    # admitted chats finish: the service's own /chat -> /generate call is not counted against the limit
    assert len(results) - len(refused) >= SERVER_LIMITS["max_concurrency"]
    # refused at the door by the admission limit, not after queueing (a batch over its latency budget is a 503 too)
    assert all(body["error"].startswith("over capacity") for status, _, body in results if status == 503), refused
    resp = chat(server, message="Still there?", **BOT_CHAT)
    assert resp.status_code == 200


def mixed_burst(url: str, n: int) -> list[dict]:
    """n requests at once, alternating /chat and /chat/stream, each a conversation of its own: the final reply
    bodies (a stream's `done` data), in order."""
    async def run() -> list[dict]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as client:
            async def one(i: int) -> dict:
                body = {"message": f"Logged turn number {i}?", "max_new_tokens": 6}
                if i % 2 == 0:
                    resp = await client.post(f"{url}/chat", json=body)
                    assert resp.status_code == 200, resp.text
                    return {**resp.json(), "endpoint": "chat"}
                async with client.stream("POST", f"{url}/chat/stream", json=body) as resp:
                    assert resp.status_code == 200
                    lines = [line async for line in resp.aiter_lines()]
                return {**json.loads(lines[lines.index("event: done") + 1].removeprefix("data: ")),
                        "endpoint": "chat/stream"}

            return await asyncio.gather(*(one(i) for i in range(n)))

    return asyncio.run(run())


def test_64_concurrent_turns_are_each_logged_once_and_survive_a_kill_9(trained, tmp_path):
    import signal

    import psutil

    url, proc = start_server(trained["bento"], tmp_path, "auto", max_concurrency=64)
    try:
        answers = mixed_burst(url, 64)
        # right after the replies, the server and its workers (bentoml starts each in a session of its own): no
        # shutdown, no late write, only what was committed before the replies went out survives
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.send_signal(signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop_process_group(proc)
    turns = logged_turns(url)
    assert turns.turn_id.is_unique and len({a["turn_id"] for a in answers}) == 64
    turns = turns.set_index("turn_id")
    missing = [a["turn_id"] for a in answers if a["turn_id"] not in turns.index]
    assert not missing, f"{len(missing)} of 64 acknowledged turns lost after kill -9"
    for answer in answers:
        row = turns.loc[answer["turn_id"]]
        assert (row.endpoint, row.reply, row.new_tokens, row.conversation_id) == (
            answer["endpoint"], answer["reply"], answer["new_tokens"], answer["conversation_id"])
        assert row.model_name == "serve-bot" and row.model_version == trained["version"]
        assert row.finish_reason in ("stop", "length") and row.latency_s > 0
    streamed = turns[turns.endpoint == "chat/stream"]
    assert len(streamed) == 32 and (streamed.ttft_s <= streamed.latency_s).all()

