"""A cast model served: one tiny model of three characters behind a real `bentoml serve`, each request answered as
the character it names (/chat, /chat/stream, /generate, /v1/chat/completions), a 404 naming the cast for anyone
else, and the chat log recording who answered. Named to run after the tests that read the main server's /metrics
(starting a server resets the shared Prometheus folder)."""

import httpx
import pytest

from tests.conftest import write_tiny_show
from tests.serve.conftest import logged_turns, metric, serve, stream_events

pytestmark = pytest.mark.service

CAST = ["Ada", "Bram", "Cleo"]
GREEDY = {"max_new_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def cast_server(prefect_harness, tmp_path_factory) -> str:
    """The tiny show as a cast (offline-tiny's chat-template layout), trained by the real flow into a Bento."""
    from flows.train import train
    from tasks.release.bento import build_bento
    from tests.conftest import tiny_config

    data = write_tiny_show(tmp_path_factory.mktemp("cast-show") / "show.csv")
    result = train(tiny_config(data, show="The Tiny Show", **{
        "character": None, "cast": CAST, "offline_model.architecture": "llama", "offline_model.n_positions": 256,
        "dialogue.max_length": 160, "gate.max_perplexity": 1e9, "evaluation.replies": 6,
        "registry.model_name": "served-cast-bot", "registry.build_bento": True, "registry.openvino": "off"}))
    # a tiny model may be refused for a member it makes worse than the base: serve its version all the same
    bento = result.get("bento") or build_bento.fn("served-cast-bot", result["version"], None, False, "off")
    yield from serve(bento, tmp_path_factory.mktemp("cast-serve"), "continuous")


def test_models_lists_the_model_and_every_member(cast_server):
    listed = httpx.get(f"{cast_server}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in listed] == ["served-cast-bot", *(f"served-cast-bot/{name}" for name in CAST)]
    assert [m["character"] for m in listed] == ["Ada", *CAST]


def test_each_request_is_answered_as_the_character_it_names(cast_server):
    default = httpx.post(f"{cast_server}/chat", json={"message": "Who is there?", **GREEDY}, timeout=60).json()
    assert default["character"] == "Ada"
    bram = httpx.post(f"{cast_server}/chat", json={"message": "Who is there?", "character": "bram", **GREEDY},
                      timeout=60).json()
    assert bram["character"] == "Bram" and bram["reply"].strip()
    events = stream_events(cast_server, {"message": "And now?", "character": "Cleo", **GREEDY})
    assert events[0] == ("start", {**events[0][1], "character": "Cleo"}) and events[-1][1]["character"] == "Cleo"
    generated = httpx.post(f"{cast_server}/generate", json={"prompts": [
        {"turns": ["Hello"], "character": "Cleo", **GREEDY}, {"turns": ["Hello"], **GREEDY}]}, timeout=60)
    assert generated.status_code == 200 and len(generated.json()) == 2
    completion = httpx.post(f"{cast_server}/v1/chat/completions", timeout=60, json={
        "model": "served-cast-bot/Bram", "max_tokens": 6, "temperature": 0,
        "messages": [{"role": "user", "content": "Who is there?"}]}).json()
    assert completion["model"] == "served-cast-bot/Bram"
    assert completion["choices"][0]["message"]["content"] == bram["reply"]  # same greedy reply on both routes

    turns = logged_turns(cast_server).set_index("turn_id")
    assert turns.loc[bram["turn_id"], "character"] == "Bram" and turns.loc[default["turn_id"], "character"] == "Ada"
    assert set(turns.character) == set(CAST)


def test_anyone_outside_the_cast_is_a_404_that_names_the_cast(cast_server):
    refused = httpx.post(f"{cast_server}/chat", json={"message": "Hi", "character": "Zed"}, timeout=30)
    assert refused.status_code == 404 and "Ada, Bram, Cleo" in refused.json()["error"], refused.text
    openai = httpx.post(f"{cast_server}/v1/chat/completions", timeout=30, json={
        "model": "served-cast-bot/Zed", "messages": [{"role": "user", "content": "Hi"}]})
    assert openai.status_code == 404 and openai.json()["error"]["code"] == "model_not_found"
    assert "Ada, Bram, Cleo" in openai.json()["error"]["message"]


def test_requests_for_different_characters_decode_in_one_batch(cast_server):
    """12 concurrent greedy requests spread over the cast: the continuous engine advances them together, so it
    takes fewer decoding steps than the tokens it generates."""
    import asyncio

    async def burst():
        async with httpx.AsyncClient(base_url=cast_server, timeout=120) as http:
            return await asyncio.gather(*(http.post("/chat", json={
                "message": f"line {i}", "character": CAST[i % 3], "max_new_tokens": 12, "temperature": 0})
                for i in range(12)))

    steps = metric(cast_server, "castbot_decoding_steps_total")
    tokens = metric(cast_server, "castbot_generated_tokens_total")
    answers = asyncio.run(burst())
    assert all(a.status_code == 200 for a in answers)
    assert {a.json()["character"] for a in answers} == set(CAST)
    steps = metric(cast_server, "castbot_decoding_steps_total") - steps
    tokens = metric(cast_server, "castbot_generated_tokens_total") - tokens
    assert 0 < steps < tokens, (steps, tokens)
