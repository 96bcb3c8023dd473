"""A cast model served: a tiny model of four Rick and Morty characters, trained by the real flow on the real
transcript (../shared/data), behind a real `bentoml serve`: each request answered as the character it names (/chat,
/chat/stream, /generate, /v1/chat/completions), a 404 naming the cast for anyone else, scenes streamed line by line
with named speakers (/scene), and the chat log recording who answered. Named to run after the tests that read the
main server's /metrics (starting a server resets the shared Prometheus folder)."""

import httpx
import pytest

from tests.serve.conftest import logged_turns, metric, serve, stream_events

pytestmark = pytest.mark.service

CAST = ["Rick", "Morty", "Summer", "Jerry"]
NAMED = "Rick, Morty, Summer, Jerry"
GREEDY = {"max_new_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def cast_server(prefect_harness, shared_data, tmp_path_factory) -> str:
    """The clean Rick and Morty transcript (1,905 lines, 11 episodes) as a cast, with the offline tiny model in the
    chat-template layout, trained by the real flow into a Bento."""
    from flows.train import train
    from tasks.release.bento import build_bento
    from tests.conftest import tiny_config

    data = shared_data / "rick_and_morty" / "RickAndMortyScripts.csv"
    result = train(tiny_config(data, show="Rick and Morty", **{
        "data.columns": {"episode": "episode name", "speaker": "name", "line": "line"},
        "character": None, "cast": CAST, "offline_model.architecture": "llama", "offline_model.n_positions": 256,
        "dialogue.max_length": 160, "gate.max_perplexity": 1e9, "evaluation.replies": 6,
        "registry.model_name": "served-cast-bot", "registry.build_bento": True, "registry.openvino": "off"}))
    # a tiny model may be refused for a member it makes worse than the base: serve its version all the same
    bento = result.get("bento") or build_bento.fn("served-cast-bot", result["version"], None, False, "off")
    yield from serve(bento, tmp_path_factory.mktemp("cast-serve"), "continuous")


def test_models_lists_the_model_and_every_member(cast_server):
    listed = httpx.get(f"{cast_server}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in listed] == ["served-cast-bot", *(f"served-cast-bot/{name}" for name in CAST)]
    assert [m["character"] for m in listed] == ["Rick", *CAST]


def test_each_request_is_answered_as_the_character_it_names(cast_server):
    default = httpx.post(f"{cast_server}/chat", json={"message": "Who is there?", **GREEDY}, timeout=60).json()
    assert default["character"] == "Rick"
    morty = httpx.post(f"{cast_server}/chat", json={"message": "Who is there?", "character": "morty", **GREEDY},
                       timeout=60).json()
    assert morty["character"] == "Morty" and morty["new_tokens"] > 0
    events = stream_events(cast_server, {"message": "And now?", "character": "Summer", **GREEDY})
    assert events[0] == ("start", {**events[0][1], "character": "Summer"}) and events[-1][1]["character"] == "Summer"
    generated = httpx.post(f"{cast_server}/generate", json={"prompts": [
        {"turns": ["Hello"], "character": "Jerry", **GREEDY}, {"turns": ["Hello"], **GREEDY}]}, timeout=60)
    assert generated.status_code == 200 and len(generated.json()) == 2
    completion = httpx.post(f"{cast_server}/v1/chat/completions", timeout=60, json={
        "model": "served-cast-bot/Morty", "max_tokens": 6, "temperature": 0,
        "messages": [{"role": "user", "content": "Who is there?"}]}).json()
    assert completion["model"] == "served-cast-bot/Morty"
    assert completion["choices"][0]["message"]["content"] == morty["reply"]  # same greedy reply on both routes

    turns = logged_turns(cast_server).set_index("turn_id")
    assert turns.loc[morty["turn_id"], "character"] == "Morty"
    assert turns.loc[default["turn_id"], "character"] == "Rick"
    assert set(turns.character) == set(CAST)


def test_anyone_outside_the_cast_is_a_404_that_names_the_cast(cast_server):
    refused = httpx.post(f"{cast_server}/chat", json={"message": "Hi", "character": "Zed"}, timeout=30)
    assert refused.status_code == 404 and NAMED in refused.json()["error"], refused.text
    openai = httpx.post(f"{cast_server}/v1/chat/completions", timeout=30, json={
        "model": "served-cast-bot/Zed", "messages": [{"role": "user", "content": "Hi"}]})
    assert openai.status_code == 404 and openai.json()["error"]["code"] == "model_not_found"
    assert NAMED in openai.json()["error"]["message"]
    scene = httpx.post(f"{cast_server}/scene", json={"characters": ["Rick", "Zed"], "opening": "Hi"}, timeout=30)
    assert scene.status_code == 404 and NAMED in scene.json()["error"], scene.text


def test_requests_for_different_characters_decode_in_one_batch(cast_server):
    """12 concurrent greedy requests spread over the cast: the continuous engine advances them together, so it
    takes fewer decoding steps than the tokens it generates."""
    import asyncio

    async def burst():
        async with httpx.AsyncClient(base_url=cast_server, timeout=120) as http:
            return await asyncio.gather(*(http.post("/chat", json={
                "message": f"line {i}", "character": CAST[i % len(CAST)], "max_new_tokens": 12, "temperature": 0})
                for i in range(12)))

    steps = metric(cast_server, "castbot_decoding_steps_total")
    tokens = metric(cast_server, "castbot_generated_tokens_total")
    answers = asyncio.run(burst())
    assert all(a.status_code == 200 for a in answers)
    assert {a.json()["character"] for a in answers} == set(CAST)
    steps = metric(cast_server, "castbot_decoding_steps_total") - steps
    tokens = metric(cast_server, "castbot_generated_tokens_total") - tokens
    assert 0 < steps < tokens, (steps, tokens)


def test_a_scene_streams_each_line_named_by_its_speaker_and_logs_it(cast_server):
    """Rick and Morty in turn after the user's opening: each line announced with its speaker, every piece named,
    each finished line logged in one conversation, each line's prompt holding the lines before it."""
    events = stream_events(cast_server, {"characters": ["rick", "Morty"], "opening": "Where are we going?",
                                         "turns": 4, "max_new_tokens": 6, "temperature": 1.0}, "/scene")
    assert events[0][0] == "start" and events[0][1]["characters"] == ["Rick", "Morty"]
    speaking, order = None, []
    for name, data in events[1:-1]:
        if name == "turn":
            speaking = data["speaker"]
            order.append(speaking)
        else:
            assert data["speaker"] == speaking, (name, data)  # pieces and the finished line name their speaker
    assert order == ["Rick", "Morty", "Rick", "Morty"]
    said = [data for name, data in events if name == "said"]
    assert [s["speaker"] for s in said] == order and all(s["new_tokens"] > 0 for s in said)
    done = events[-1]
    assert done[0] == "done" and [line["speaker"] for line in done[1]["lines"]] == [
        s["speaker"] for s in said if s["reply"].strip()]

    whole = stream_events(cast_server, {"opening": "Hi", "turns": 5, "max_new_tokens": 4}, "/scene")
    assert [data["speaker"] for name, data in whole if name == "turn"] == [*CAST, CAST[0]]  # no names: everyone

    turns = logged_turns(cast_server).set_index("turn_id").loc[[s["turn_id"] for s in said]]
    assert list(turns.character) == order and set(turns.endpoint) == {"scene"}
    assert set(turns.conversation_id) == {done[1]["conversation_id"]}
    # the last line was prompted with the opening and the lines before it (a blank one is left out)
    lines = [[s["speaker"], s["reply"].strip()] for s in said[:-1] if s["reply"].strip()]
    heard = [["", "Where are we going?"], *lines]
    assert [*turns.iloc[-1]["history"], [heard[-1][0], turns.iloc[-1]["message"]]] == heard


def test_a_scene_whose_conversation_is_deleted_stops_and_leaves_nothing_logged(cast_server):
    """DELETE /conversations/{id} while a 16-line scene plays: the scene ends early, saying why, and none of its
    lines stays in the log (the one being said when it was deleted included)."""
    import json

    events, conversation = [], None
    body = {"characters": CAST, "opening": "Everybody in the car.", "turns": 16, "max_new_tokens": 30}
    with httpx.stream("POST", f"{cast_server}/scene", json=body, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        name = "message"
        for line in resp.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
                if name == "start":
                    conversation = events[-1][1]["conversation_id"]
                if name == "said" and sum(n == "said" for n, _ in events) == 1:
                    deleted = httpx.delete(f"{cast_server}/conversations/{conversation}", timeout=30)
                    assert deleted.status_code == 200, deleted.text
    done, said = events[-1], sum(n == "said" for n, _ in events)
    assert done[0] == "done", events[-3:]
    # a scene that had not finished when its conversation was deleted stops (a tiny model may have finished first)
    assert (done[1]["stopped"], said < 16) in (("deleted", True), (None, False)), (done, said)
    assert conversation not in set(logged_turns(cast_server).conversation_id)


def test_the_web_page_plays_a_scene_in_headless_chromium(cast_server, browser):
    """The picker lists the cast; "Play a scene" with Morty picked streams lines by Morty, then the others in
    turn, each shown under its speaker's name with its rating buttons."""
    browser.send("Page.enable")
    browser.send("Page.navigate", url=f"{cast_server}/ui/")
    browser.wait_for("!document.getElementById('scene').hidden")  # shown once /v1/models lists a cast
    assert browser.eval("[...document.getElementById('character').options].map((o) => o.value)") == CAST
    browser.eval("document.getElementById('character').value = 'Morty';"
                 "document.getElementById('message').value = 'Who left the portal open?';"
                 "document.getElementById('scene').click()")
    lines = browser.wait_for("(() => { const e = document.querySelector('.turn.error'); if (e) return [e.textContent];"
                             " const bots = [...document.querySelectorAll('.turn.bot')];"
                             " return !document.getElementById('scene').disabled && bots.length === 6 &&"
                             " bots.map((b) => [b.childNodes[0].textContent, b.querySelectorAll('.rate').length]);"
                             " })()")
    assert [name for name, _ in lines] == [f"{who}:" for who in ["Morty", "Rick", "Summer", "Jerry", "Morty", "Rick"]]
    assert all(buttons == 2 for _, buttons in lines), lines
    assert browser.eval("document.querySelector('.turn.user').textContent") == "You:Who left the portal open?"
    shown = browser.eval("document.getElementById('conversation').textContent")
    scene = logged_turns(cast_server)
    scene = scene[scene.conversation_id == shown.removeprefix("Conversation ")]
    assert list(scene.character) == ["Morty", "Rick", "Summer", "Jerry", "Morty", "Rick"]
