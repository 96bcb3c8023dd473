"""The same Bento served with the other engines: BentoML's adaptive batching and transformers' continuous
batching give the default engine's greedy reply, batch concurrent chats, and log which engine answered.

Each test's server starts here, after the files that read `server`'s own /metrics (see conftest.py)."""

import re

import httpx
import pytest

from tests.serve.conftest import BOT_CHAT, burst, chat, logged_turns, metric, stream_events

pytestmark = pytest.mark.service


def batch_histogram(url: str) -> dict[str, float]:
    """castbot_generate_batch_size from /metrics: bucket le -> cumulative count, plus _count and _sum."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        match = re.match(r'castbot_generate_batch_size_(bucket\{le="([^"]+)"\}|count|sum)\s+(\S+)', line)
        if match:
            values[match.group(2) or match.group(1)] = float(match.group(3))
    return values


def test_both_engines_give_the_same_greedy_reply(server, adaptive_server):
    body = {"message": "Is the rocket ready?", "temperature": 0, "no_repeat_ngram_size": 0, "max_new_tokens": 12}
    default, adaptive = chat(server, **body).json(), chat(adaptive_server, **body).json()
    assert default["reply"] == adaptive["reply"] and default["new_tokens"] == adaptive["new_tokens"]
    name, streamed = stream_events(adaptive_server, body)[-1]
    ids = {"turn_id", "conversation_id"}
    assert name == "done" and streamed["turn_id"] != adaptive["turn_id"]  # each answer is a turn of its own
    assert {k: v for k, v in streamed.items() if k not in ids} == {k: v for k, v in adaptive.items() if k not in ids}


def test_concurrent_chats_run_in_batches_with_adaptive_batching(adaptive_server):
    server = adaptive_server
    for _ in range(3):  # the dispatcher spends its first ~20 calls measuring latency with small batches
        before = batch_histogram(server)
        results = burst(server, 16, **BOT_CHAT)
        after = batch_histogram(server)
        assert [status for status, _, _ in results] == [200] * 16
        assert after["sum"] - before["sum"] == 16  # every prompt ran once
        calls = after["count"] - before["count"]
        if calls - (after["1.0"] - before["1.0"]) > 0:  # a generate() call with more than one prompt
            assert calls < 16
            return
    pytest.fail(f"16 concurrent chats never ran in a batch larger than 1: {after}")


# Last in this file, after the adaptive server's metrics are read: starting another `bentoml serve` wipes BentoML's
# shared Prometheus folder (BENTOML_HOME/prometheus_multiproc_dir), so the servers started earlier report empty
# metrics afterwards.
def test_the_continuous_engine_serves_the_same_greedy_reply_streamed_batched_and_logged(server, continuous_server):
    body = {"message": "Is the rocket ready?", "temperature": 0, "no_repeat_ngram_size": 0, "max_new_tokens": 12}
    openvino, continuous = chat(server, **body).json(), chat(continuous_server, **body).json()
    assert openvino["reply"] == continuous["reply"] and openvino["new_tokens"] == continuous["new_tokens"]
    events = stream_events(continuous_server, body)
    name, streamed = events[-1]
    assert name == "done" and "".join(data["text"] for event, data in events if event == "message").strip() == \
        continuous["reply"]
    before = metric(continuous_server, "castbot_decoding_steps_total")
    results = burst(continuous_server, 16, **BOT_CHAT)
    assert [status for status, _, _ in results] == [200] * 16
    assert metric(continuous_server, "castbot_decoding_steps_total") > before  # decoding steps counted
    logged = logged_turns(continuous_server).set_index("turn_id")
    assert logged.loc[continuous["turn_id"], "engine"] == "continuous"
    assert logged.loc[streamed["turn_id"], "reply"] == continuous["reply"]
    assert logged_turns(server).set_index("turn_id").loc[openvino["turn_id"], "engine"] == "openvino"  # the default
