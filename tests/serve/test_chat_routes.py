"""The chat routes of the served Bento: /chat, /generate and /chat/stream, their 4xx refusals, health, metrics and
the docs page, and what each turn leaves in the conversation log (ids, cancelled streams, feedback)."""

import json
import re
import time

import httpx
import pytest

from tests.conftest import CHARACTER
from tests.serve.conftest import BIG, BOT_CHAT, SERVER_LIMITS, chat, logged_turns, stream_events

pytestmark = pytest.mark.service


@pytest.fixture(scope="session")
def chat_model(trained):
    """The served model's Bot, loaded from the BentoML store as the service loads it."""
    import bentoml

    from castbot.model.bot import Bot

    bento = bentoml.get(trained["bento"])
    [model_tag] = [m.tag for m in bento.info.all_models]
    return Bot.load(bentoml.models.get(model_tag).path)


@pytest.fixture(scope="session")
def tokenizer(chat_model):
    return chat_model.tokenizer


def test_chat_round_trip(server, trained):
    resp = chat(server, message="Is the rocket ready?", **BOT_CHAT)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert isinstance(body["reply"], str) and body["reply"].strip()
    assert body["model_name"] == "serve-bot" and body["model_version"] == trained["version"]
    assert body["character"] == CHARACTER
    assert 1 <= body["new_tokens"] <= BOT_CHAT["max_new_tokens"]


def test_reply_is_conditioned_on_the_history(server, tokenizer, chat_model):
    from castbot.model.dialogue import DialogueFormat

    def prompt_ids(tokenizer, texts, max_tokens):  # the eos format the served model was trained in
        return DialogueFormat().prompt_ids(tokenizer, [("", text) for text in texts], max_tokens)

    budget = chat_model.prompt_budget(BOT_CHAT["max_new_tokens"])  # the trained length, within the positions
    assert budget == 48  # tiny_config's dialogue.max_length, not the 128-position table
    message = "Is the rocket ready?"
    history = [{"speaker": "Bram", "text": "The rocket needs fuel."}, {"speaker": "Ada", "text": "Science is simple."}]
    alone = chat(server, message=message, temperature=0, **BOT_CHAT).json()
    with_history = chat(server, history=history, message=message, temperature=0, **BOT_CHAT).json()
    # the server built exactly the dialogue-format prompt of history + message
    assert alone["prompt_tokens"] == len(prompt_ids(tokenizer, [message], budget))
    assert with_history["prompt_tokens"] == len(prompt_ids(tokenizer, [h["text"] for h in history] + [message], budget))
    assert with_history["prompt_tokens"] > alone["prompt_tokens"]
    # greedy decoding is deterministic for the same conversation, and the history changes what is said
    assert chat(server, message=message, temperature=0, **BOT_CHAT).json()["reply"] == alone["reply"]
    histories = [history, history[:1], [{"speaker": "Cleo", "text": "Science is never simple but the answer is."}]]
    replies = {chat(server, history=h, message=message, temperature=0, **BOT_CHAT).json()["reply"] for h in histories}
    assert replies - {alone["reply"]}, "no history changed the greedy reply"
    # a history longer than the context is cut from the oldest turn, not refused
    long = [{"speaker": "Bram", "text": "the rocket needs fuel before we fly to the moon tonight " * 3}] * 8
    cut = chat(server, history=long, message=message, temperature=0, **BOT_CHAT)
    assert cut.status_code == 200 and cut.json()["prompt_tokens"] <= budget


@pytest.mark.parametrize("route, body, field", [
    ("/chat", {"message": ""}, "message"),
    ("/chat", {"message": "   "}, "message"),
    ("/chat", {"message": BIG}, "message"),
    ("/chat", {"history": []}, "message"),
    ("/chat", {"message": 5}, "message"),
    ("/chat", {"message": "hi", "history": "hello"}, "history"),
    ("/chat", {"message": "hi", "history": [{"speaker": "Bram"}]}, "history.0.text"),
    ("/chat", {"message": "hi", "history": [{"text": "a"}] * (SERVER_LIMITS["max_history_turns"] + 1)}, "history"),
    ("/chat", {"message": "hi", "mood": "happy"}, "mood"),
    ("/chat", {"message": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ("/chat", {"message": "hi", "max_new_tokens": SERVER_LIMITS["max_new_tokens"] + 1}, "max_new_tokens"),
    ("/chat", {"message": "hi", "max_new_tokens": "many"}, "max_new_tokens"),
    ("/chat", {"message": "hi", "temperature": -0.1}, "temperature"),
    ("/chat", {"message": "hi", "temperature": 9}, "temperature"),
    ("/chat", {"message": "hi", "top_p": 0}, "top_p"),
    ("/generate", {"prompts": []}, "prompts"),
    ("/generate", {"prompts": [{"turns": ["hi"]}] * (SERVER_LIMITS["max_prompts"] + 1)}, "prompts"),
    ("/generate", {"prompts": [{"turns": ["hi"], "top_k": -1}]}, "prompts.0.top_k"),
])
def test_bad_input_gets_a_400_naming_the_field(server, route, body, field):
    resp = httpx.post(f"{server}{route}", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    locations = [".".join(map(str, d["loc"])) for d in resp.json()["detail"]]
    assert field in locations, locations


def test_body_that_is_not_json_or_not_an_object_gets_a_400(server):
    for content in (b"{not json", b"[1, 2]"):
        resp = httpx.post(f"{server}/chat", content=content, headers={"content-type": "application/json"}, timeout=30)
        assert resp.status_code == 400 and resp.json()["detail"], resp.text


def test_oversized_body_gets_a_413_naming_the_body(server):
    body = json.dumps({"message": "hi", "history": [{"text": "y" * 150}] * 60}).encode()
    assert len(body) > SERVER_LIMITS["max_request_bytes"]
    for content in (body, iter([body[:4000], body[4000:]])):  # with Content-Length, then chunked
        resp = httpx.post(f"{server}/chat", content=content, headers={"content-type": "application/json"}, timeout=30)
        assert resp.status_code == 413 and resp.json()["field"] == "body", resp.text


def test_generate_takes_a_list_of_prompts_and_returns_one_reply_each(server):
    prompts = [{"turns": ["Is the rocket ready?"], "max_new_tokens": 6},
               {"turns": ["Fuel?", "Full.", "Then fly?"], "max_new_tokens": 4, "temperature": 0}]
    resp = httpx.post(f"{server}/generate", json={"prompts": prompts}, timeout=60)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert len(out) == 2 and all(isinstance(o["reply"], str) for o in out)
    assert out[0]["new_tokens"] <= 6 and out[1]["new_tokens"] <= 4


def test_health_metrics_and_openapi(server):
    assert httpx.get(f"{server}/livez").status_code == 200
    assert httpx.get(f"{server}/readyz").status_code == 200
    assert "castbot_generate_batch_size_bucket" in httpx.get(f"{server}/metrics").text
    spec = httpx.get(f"{server}/docs.json").json()
    assert {"/chat", "/generate"} <= set(spec["paths"])
    # the docs page a user opens: its local scripts load, and the one that starts Swagger UI points at the spec
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    scripts = re.findall(r'<script src="\./([^"]+)"', page.text)
    assert "static_content/swagger-initializer.js" in scripts, scripts
    assert all(httpx.get(f"{server}/{script}").status_code == 200 for script in scripts), scripts
    initializer = httpx.get(f"{server}/static_content/swagger-initializer.js").text
    [spec_url] = re.findall(r'url:\s*"\./([^"]+)"', initializer)
    assert {"/chat", "/generate"} <= set(httpx.get(f"{server}/{spec_url}").json()["paths"]), spec_url


def test_chat_stream_sends_the_reply_piece_by_piece(server, trained):
    body = {"message": "Is the rocket ready?", "temperature": 0, "max_new_tokens": 12}
    events = stream_events(server, body)
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-1] == "done" and names.count("message") >= 2, names
    start, done = events[0][1], events[-1][1]
    assert start == {"model_name": "serve-bot", "model_version": trained["version"], "character": CHARACTER}
    assert "".join(data["text"] for name, data in events if name == "message").strip() == done["reply"]
    assert done["reply"] == chat(server, **body).json()["reply"]  # the same reply /chat gives, greedy
    assert done["model_version"] == trained["version"] and 1 <= done["new_tokens"] <= 12
    metrics = httpx.get(f"{server}/metrics").text
    assert "castbot_time_to_first_token_seconds_count" in metrics and "castbot_generated_tokens_total" in metrics
    assert "castbot_requests_in_flight" in metrics and "castbot_running_batch_size" in metrics
    refused = httpx.post(f"{server}/chat/stream", json={"message": ""}, timeout=30)
    assert refused.status_code == 400 and "message" in refused.text


# ---- the conversation log and feedback ---------------------------------------------------------------------


def test_conversation_ids_and_generate_turns_are_logged(server):
    # a conversation keeps its id from turn to turn when the client sends it back
    first = chat(server, message="Who are you?", **BOT_CHAT).json()
    second = chat(server, message="And then?", conversation_id=first["conversation_id"],
                  history=[{"speaker": "user", "text": "Who are you?"}, {"speaker": "bot", "text": first["reply"]}],
                  **BOT_CHAT).json()
    assert second["conversation_id"] == first["conversation_id"] and second["turn_id"] != first["turn_id"]
    row = logged_turns(server).set_index("turn_id").loc[second["turn_id"]]
    assert (row.message, row.history_turns) == ("And then?", 2)

    generated = httpx.post(f"{server}/generate", json={"prompts": [{"turns": ["Hello?"], "max_new_tokens": 4},
                                                                  {"turns": ["Bye?"], "max_new_tokens": 4}]},
                           timeout=60).json()
    logged = logged_turns(server).set_index("turn_id")
    assert [logged.loc[g["turn_id"]].message for g in generated] == ["Hello?", "Bye?"]


def test_a_stream_the_client_leaves_is_logged_as_cancelled(server):
    """The client reads the start event and one piece, then hangs up while the reply is still being generated."""
    for attempt in range(5):
        message = f"Tell me everything, attempt {attempt}."
        with httpx.stream("POST", f"{server}/chat/stream", timeout=60,
                          json={"message": message, "max_new_tokens": 32, "temperature": 2, "top_k": 0}) as resp:
            lines = resp.iter_lines()
            assert next(lines) == "event: start"
            next(line for line in lines if line.startswith("data: {\"text\""))
        for _ in range(100):  # the server notices the hang-up and logs the turn without waiting on the client
            rows = logged_turns(server)
            rows = rows[rows.message == message]
            if len(rows):
                break
            time.sleep(0.1)
        assert len(rows) == 1, f"turn of attempt {attempt} not logged once: {len(rows)} rows"
        if rows.iloc[0].finish_reason == "cancelled":
            assert rows.iloc[0].endpoint == "chat/stream" and rows.iloc[0].new_tokens < 32
            return
    pytest.fail("every reply finished before the client left: the race was not tested")


def test_feedback_rates_a_served_turn(server):
    answer = chat(server, message="Rate me.", **BOT_CHAT).json()
    saved = httpx.post(f"{server}/feedback", json={"turn_id": answer["turn_id"], "rating": -1}, timeout=30)
    assert saved.status_code == 200 and saved.json() == {"turn_id": answer["turn_id"], "rating": -1}
    again = httpx.post(f"{server}/feedback", json={"turn_id": answer["turn_id"], "rating": 1, "comment": "better"},
                       timeout=30)
    assert again.status_code == 200
    row = logged_turns(server).set_index("turn_id").loc[answer["turn_id"]]
    assert (row.rating, row.comment) == (1, "better")  # the last rating counts

    unknown = httpx.post(f"{server}/feedback", json={"turn_id": "no-such-turn", "rating": 1}, timeout=30)
    assert unknown.status_code == 404 and "no-such-turn" in unknown.text
    for body, field in [({"turn_id": answer["turn_id"], "rating": 5}, "rating"),
                        ({"turn_id": answer["turn_id"], "rating": True}, "rating"),
                        ({"rating": 1}, "turn_id")]:
        refused = httpx.post(f"{server}/feedback", json=body, timeout=30)
        assert refused.status_code == 400 and field in refused.text, (body, refused.text)
