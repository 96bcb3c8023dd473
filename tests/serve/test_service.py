"""The chat service: a tiny model trained by the real flow, built into a Bento, served by a real `bentoml serve`."""

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import CHARACTER, REPO, free_port, stop_process_group, tiny_config, write_tiny_show

pytestmark = pytest.mark.service

# the served process's limits (CASTBOT_SERVE_*); small so the bad-input and overload cases are cheap
SERVER_LIMITS = {"max_message_chars": 200, "max_turn_chars": 200, "max_history_turns": 8, "max_new_tokens": 32,
                 "max_prompts": 4, "max_request_bytes": 8192, "max_concurrency": 24, "max_batch_size": 16,
                 "torch_threads": 1,
                 "dtype": "float32"}  # both engines in the same exact arithmetic, so greedy replies can be compared
BOT_CHAT = {"max_new_tokens": 8}
CHATLOGS: dict[str, str] = {}  # served URL -> its conversation log's SQLAlchemy URL


def wait_ready(url: str, proc: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"bentoml serve not ready after {seconds} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def trained(prefect_harness, tmp_path_factory) -> dict:
    """The training flow with build_bento on: a promoted tiny model, its Bento and the MLflow version."""
    from flows.train import train

    data = write_tiny_show(tmp_path_factory.mktemp("show") / "show.csv")
    # fp32: the OpenVINO engine's greedy replies can then equal the torch engines' (int8 is tested on its own)
    result = train(tiny_config(data, **{"registry.model_name": "serve-bot", "registry.build_bento": True,
                                        "registry.openvino": "fp32"}))
    assert result["promoted"], result["reason"]
    return result


def start_server(bento: str, workdir: Path, engine: str, **limits) -> tuple[str, subprocess.Popen]:
    """`bentoml serve BENTO` with the given engine (auto: the default) on a free loopback port, its conversation
    log in workdir; limits override SERVER_LIMITS."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    CHATLOGS[url] = f"sqlite:///{workdir / 'chatlog.db'}"
    env = {**os.environ, **{f"CASTBOT_SERVE_{k.upper()}": str(v) for k, v in {**SERVER_LIMITS, **limits}.items()},
           "CASTBOT_SERVE_ENGINE": engine, "CASTBOT_CHATLOG_URL": CHATLOGS[url]}
    # the Bento holds its OpenVINO export: serving must not need the exporter
    env["CASTBOT_OPENVINO_EXPORTER"] = str(workdir / "no-exporter-here")
    log = workdir / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("bentoml")), "serve", bento,
                                 "--host", "127.0.0.1", "--port", str(port)],
                                cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_ready(url, proc, log)
    return url, proc


def serve(bento: str, workdir: Path, engine: str):
    """start_server, stopped when the generator ends."""
    url, proc = start_server(bento, workdir, engine)
    try:
        yield url
    finally:
        stop_process_group(proc)


def logged_turns(url: str):
    """The served process's conversation log, read as the monitor and the export read it."""
    from castbot.chatlog.store import ChatLog

    log = ChatLog(CHATLOGS[url])
    try:
        return log.turns()
    finally:
        log.close()


@pytest.fixture(scope="session")
def server(trained, tmp_path_factory) -> str:
    """The Bento served with the default engine: auto, OpenVINO's on CPU from the Bento's own export."""
    yield from serve(trained["bento"], tmp_path_factory.mktemp("serve"), "auto")


@pytest.fixture(scope="session")
def continuous_server(trained, tmp_path_factory) -> str:
    """The same Bento served with transformers' continuous batching."""
    yield from serve(trained["bento"], tmp_path_factory.mktemp("serve-continuous"), "continuous")


@pytest.fixture(scope="session")
def adaptive_server(trained, tmp_path_factory) -> str:
    """The same Bento served with BentoML's adaptive batching."""
    yield from serve(trained["bento"], tmp_path_factory.mktemp("serve-adaptive"), "adaptive")


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


def chat(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/chat", json=body, timeout=60)


def batch_histogram(url: str) -> dict[str, float]:
    """castbot_generate_batch_size from /metrics: bucket le -> cumulative count, plus _count and _sum."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        match = re.match(r'castbot_generate_batch_size_(bucket\{le="([^"]+)"\}|count|sum)\s+(\S+)', line)
        if match:
            values[match.group(2) or match.group(1)] = float(match.group(3))
    return values


def metric(url: str, name: str) -> float:
    """One sample from /metrics (BentoML's multiprocess metrics may label it with the worker's pid)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    [value] = [float(line.split()[-1]) for line in text.splitlines() if re.match(rf"{name}(\{{[^}}]*\}})? ", line)]
    return value


# ---- the build --------------------------------------------------------------------------------------------


def castbot_imports(src: Path) -> set[str]:
    """Every castbot module the Bento's own code imports (at the top or inside a function)."""
    import ast

    names = set()
    for path in [src / "service.py", *(src / "castbot").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "castbot":
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names
                                          if module_file(src, f"{node.module}.{a.name}")}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names if a.name.split(".")[0] == "castbot"}
    return names


def module_file(src: Path, name: str) -> bool:
    path = src.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_flow_builds_a_bento_and_tags_the_model_version(trained):
    import bentoml
    from mlflow import MlflowClient

    from castbot.serve.engines.openvino import read_built_card

    version = MlflowClient().get_model_version(trained["model_name"], trained["version"])
    assert version.tags["castbot.bento"] == trained["bento"]
    bento = bentoml.get(trained["bento"])
    [model_tag] = [m.tag for m in bento.info.all_models]
    labels = bentoml.models.get(model_tag).info.labels
    assert labels["mlflow_model"] == "serve-bot" and labels["mlflow_version"] == trained["version"]
    assert labels["character"] == CHARACTER
    assert bento.info.args == {"model": str(model_tag)}
    src = Path(bento.path) / "src"
    assert (src / "castbot" / "model" / "dialogue.py").is_file() and (src / "web" / "chat.html").is_file()
    # the OpenVINO export made at build time, its test perplexity measured beside the model's own
    card = read_built_card(bentoml.models.get(model_tag).path)
    assert card["weights"] == "fp32" and card["reference_perplexity"] == pytest.approx(trained["perplexity"])
    assert card["fp32_test_perplexity"] == pytest.approx(trained["perplexity"], rel=0.01)
    assert version.tags["castbot.openvino"].startswith("fp32: test perplexity")
    assert not (src / "tasks").exists() and not (src / "flows").exists()
    missing = [name for name in castbot_imports(src) if not module_file(src, name)]
    assert not missing, f"the Bento's code imports castbot modules its bentofile leaves out: {missing}"


def test_standalone_command_builds_for_a_given_version(trained):
    from mlflow import MlflowClient

    done = subprocess.run([sys.executable, "-m", "tasks.release.bento", "--model", "serve-bot", "--version", trained["version"]],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    tag = re.search(r"built (\S+);", done.stdout).group(1)
    assert tag.startswith("castbot-chat:") and tag != trained["bento"]
    assert MlflowClient().get_model_version("serve-bot", trained["version"]).tags["castbot.bento"] == tag

    missing = subprocess.run([sys.executable, "-m", "tasks.release.bento", "--model", "no-such-bot"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "no-such-bot" in missing.stderr

    # the version's import holds fp32 OpenVINO weights; int8 would change what its Bentos serve
    other = subprocess.run([sys.executable, "-m", "tasks.release.bento", "--model", "serve-bot", "--version",
                            trained["version"], "--openvino", "int8"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert other.returncode == 1 and "already imported with OpenVINO weights fp32, not int8" in other.stderr
    assert MlflowClient().get_model_version("serve-bot", trained["version"]).tags["castbot.bento"] == tag


# ---- the served Bento ---------------------------------------------------------------------------------------


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


BIG = "x" * (SERVER_LIMITS["max_message_chars"] + 1)


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


def burst(url: str, n: int, **body) -> list[tuple[int, float, dict]]:
    """n /chat calls sent at once from one event loop: (status, seconds, body) each."""
    async def run() -> list[tuple[int, float, dict]]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:
            async def one(i: int) -> tuple[int, float, dict]:
                start = time.monotonic()
                resp = await client.post(f"{url}/chat", json={"message": f"Is the rocket ready for flight {i}?", **body})
                return resp.status_code, time.monotonic() - start, resp.json()

            return await asyncio.gather(*(one(i) for i in range(n)))

    return asyncio.run(run())


def test_concurrent_chats_share_decoding_steps(server):
    before = metric(server, "castbot_decoding_steps_total")
    results = burst(server, 16, **BOT_CHAT)
    steps = metric(server, "castbot_decoding_steps_total") - before
    assert [status for status, _, _ in results] == [200] * 16
    tokens = sum(body["new_tokens"] for _, _, body in results)
    # one request at a time would take a step per generated token; together, steps carry many requests each
    assert 0 < steps < tokens / 2, (steps, tokens)


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


BURSTS = (8, 16, 32)  # x max_concurrency: a fast engine can answer a small burst before it piles up past the limit


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


def stream_events(url: str, body: dict) -> list[tuple[str, dict]]:
    """(event, data) pairs of one /chat/stream response."""
    events, name = [], "message"
    with httpx.stream("POST", f"{url}/chat/stream", json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
            elif not line:
                name = "message"
    return events


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


def test_terminal_chat_keeps_the_history(server):
    done = subprocess.run([sys.executable, "-m", "castbot.chat", "--url", server, "--verbose", "--max-new-tokens", "6"],
                          input="Is the rocket ready?\nAnd the moon?\n/quit\n", capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    replies = [line for line in done.stdout.splitlines() if line.startswith(f"{CHARACTER}> ")]
    sizes = [int(n) for n in re.findall(r"prompt (\d+) tokens", done.stdout)]
    assert len(replies) == 2 and len(sizes) == 2
    assert sizes[1] > sizes[0]  # the second prompt carries the first exchange


# ---- the OpenAI-compatible API, through the official openai client -------------------------------------------


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
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400, "messages[1].role"),
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
    resp = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
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


# ---- the Telegram bot against a fake Bot API server -----------------------------------------------------------

TOKEN = "123456:TEST-token-never-logged"


class FakeBotAPI:
    """A Bot API server on 127.0.0.1 (starlette under uvicorn, in a thread): getUpdates hands out the updates
    queued by send(), sendMessage and sendChatAction are recorded per chat; other methods answer true."""

    def __init__(self):
        import threading

        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        self.updates: list[dict] = []
        self.calls: list[tuple[str, dict]] = []
        self.lock, self.next_update, self.next_message = threading.Lock(), 1, 1

        async def method(request):
            if request.path_params["token"] != f"bot{TOKEN}":
                return JSONResponse({"ok": False, "error_code": 401, "description": "Unauthorized"}, 401)
            name, params = request.path_params["method"], dict(await request.form())
            return JSONResponse({"ok": True, "result": await self.answer(name, params)})

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[Route("/{token}/{method}", method, methods=["GET", "POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    async def answer(self, name: str, params: dict):
        if name == "getMe":
            return {"id": 42, "is_bot": True, "first_name": "Ada", "username": "ada_castbot"}
        if name == "getUpdates":
            offset = int(params.get("offset", 0))
            for _ in range(20):  # a short long-poll
                with self.lock:
                    ready = [u for u in self.updates if u["update_id"] >= offset]
                if ready:
                    return ready
                await asyncio.sleep(0.1)
            return []
        with self.lock:
            self.calls.append((name, params))
            self.next_message += 1
            message_id = self.next_message
        if name == "sendMessage":
            return {"message_id": message_id, "date": int(time.time()), "text": params["text"],
                    "chat": {"id": int(params["chat_id"]), "type": "private"}}
        return True

    def send(self, chat_id: int, text: str) -> None:
        """A user in chat chat_id writes text (a /command gets its bot_command entity, as Telegram sends it)."""
        entities = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}] if text.startswith("/") else []
        with self.lock:
            self.next_message += 1
            self.updates.append({"update_id": self.next_update, "message": {
                "message_id": self.next_message, "date": int(time.time()), "text": text, "entities": entities,
                "chat": {"id": chat_id, "type": "private"}, "from": {"id": chat_id, "is_bot": False, "first_name": "U"}}})
            self.next_update += 1

    def sent(self, chat_id: int, name: str = "sendMessage") -> list[str]:
        with self.lock:
            return [p.get("text", p.get("action")) for n, p in self.calls if n == name and int(p["chat_id"]) == chat_id]

    def wait_replies(self, chat_id: int, count: int, seconds: float = 90) -> list[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if len(replies := self.sent(chat_id)) >= count:
                return replies
            time.sleep(0.1)
        raise AssertionError(f"chat {chat_id}: {count} replies expected, got {self.sent(chat_id)}")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def bot_api():
    api = FakeBotAPI()
    yield api
    api.close()


def start_telegram_bot(url: str, api: FakeBotAPI, log: Path) -> subprocess.Popen:
    env = {**os.environ, "TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_API_URL": api.url}
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "castbot.telegram", "--url", url, "--max-new-tokens", "8"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_telegram_bot_keeps_each_chats_history_and_resets(server, bot_api, tmp_path):
    log = tmp_path / "telegram.log"
    proc = start_telegram_bot(server, bot_api, log)
    try:
        bot_api.send(1, "/start")
        [hello] = bot_api.wait_replies(1, 1)
        assert f"I'm {CHARACTER}" in hello and "serve-bot" in hello
        bot_api.send(1, "Telegram: is the rocket ready?")
        bot_api.wait_replies(1, 2)
        bot_api.send(1, "Telegram: and the moon?")
        bot_api.send(2, "Telegram: who are you?")  # another chat, at the same time
        replies = bot_api.wait_replies(1, 3)
        [other] = bot_api.wait_replies(2, 1)
        assert all(r.strip() for r in replies) and other.strip()
        assert "typing" in bot_api.sent(1, "sendChatAction")
        bot_api.send(1, "/reset")
        bot_api.send(1, "Telegram: fresh start?")
        bot_api.send(1, "x" * (SERVER_LIMITS["max_message_chars"] + 1))  # over the service's limit
        replies = bot_api.wait_replies(1, 6)
        assert replies[3].startswith("Forgotten") and "too long" in replies[5]
    finally:
        stop_process_group(proc)
    turns = logged_turns(server).set_index("message")
    first, second, fresh = (turns.loc[f"Telegram: {m}"] for m in ("is the rocket ready?", "and the moon?",
                                                                   "fresh start?"))
    assert (first.history_turns, second.history_turns, fresh.history_turns) == (0, 2, 0)
    assert second.conversation_id == first.conversation_id != fresh.conversation_id  # one conversation per chat
    assert turns.loc["Telegram: who are you?"].conversation_id not in (first.conversation_id, fresh.conversation_id)
    text = log.read_text()
    assert TOKEN not in text and TOKEN.split(":")[1] not in text, text[-2000:]


def test_telegram_bot_says_when_the_service_is_down(bot_api, tmp_path):
    log = tmp_path / "telegram.log"
    proc = start_telegram_bot(f"http://127.0.0.1:{free_port()}", bot_api, log)  # nothing listens there
    try:
        bot_api.send(7, "Hello?")
        [reply] = bot_api.wait_replies(7, 1)
    finally:
        stop_process_group(proc)
    assert "service is down" in reply
    text = log.read_text()
    assert "ConnectError" in text and TOKEN not in text, text[-2000:]


# ---- the web page in headless Chromium ---------------------------------------------------------------------


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws, self.next_id = connect(ws_url, max_size=None), 0

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def eval(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, seconds: float = 60):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if value := self.eval(expression):
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expression}")


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium with remote debugging on a free loopback port: the page target's DevTools client."""
    exe = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
    if exe is None:
        pytest.fail("chromium is not installed: `make system-packages` installs it (apt-get install -y chromium)")
    port = free_port()
    proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync", "--no-first-run",
                             f"--user-data-dir={tmp_path / 'profile'}", f"--remote-debugging-port={port}",
                             "--remote-debugging-address=127.0.0.1", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, pages = time.monotonic() + 60, []
        while not pages and time.monotonic() < deadline:
            try:
                pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                         if t["type"] == "page"]
            except httpx.HTTPError:
                time.sleep(0.3)
        assert pages, "chromium did not open its debugging port"
        devtools = DevTools(pages[0]["webSocketDebuggerUrl"])
        yield devtools
        devtools.ws.close()
    finally:
        stop_process_group(proc, timeout=10)


def test_web_page_chat_in_headless_chromium(server, browser):
    browser.send("Page.enable")
    browser.send("Page.navigate", url=f"{server}/ui/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('send')")
    browser.eval("document.getElementById('message').focus()")
    browser.send("Input.insertText", text="Is the rocket ready?")
    box = browser.eval("(() => { const r = document.getElementById('send').getBoundingClientRect();"
                       " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    for kind in ("mousePressed", "mouseReleased"):
        browser.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)
    # the bot's turn appears on the stream's "start" event and fills in; its thumbs come with "done"
    answer = browser.wait_for("(() => { const e = document.querySelector('.turn.error');"
                              " if (e) return [e.className, e.textContent];"
                              " const b = document.querySelector('.turn.bot');"
                              " return b && b.querySelector('.rate') && [b.className, b.childNodes[0].textContent,"
                              " b.childNodes[1].textContent]; })()")
    assert answer[0] == "turn bot", answer  # the page shows refused requests as "turn error"
    assert answer[1] == f"{CHARACTER}:" and answer[2].strip(), answer
    assert browser.eval("document.querySelector('.turn.user').textContent") == "You:Is the rocket ready?"
    assert "serve-bot" in browser.eval("document.getElementById('who').textContent")
    assert int(browser.eval("document.querySelector('.turn.bot').dataset.pieces || 0")) >= 1, "the reply streamed"

    # thumbs down on the reply: the rating lands in the conversation log, on that turn
    browser.wait_for("!!document.querySelector('.turn.bot .rate[data-rating=\"-1\"]')")
    box = browser.eval("(() => { const r = document.querySelector('.turn.bot .rate[data-rating=\"-1\"]')"
                       ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    for kind in ("mousePressed", "mouseReleased"):
        browser.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)
    browser.wait_for("document.querySelector('.turn.bot .rate[data-rating=\"-1\"]')"
                     ".getAttribute('aria-pressed') === 'true'")
    rated = logged_turns(server).dropna(subset=["rating"])
    rated = rated[(rated.endpoint == "chat/stream") & (rated.message == "Is the rocket ready?")]
    assert list(rated.rating) == [-1], rated[["turn_id", "rating"]]


def test_the_published_spec_holds_for_every_response_schemathesis(server, tmp_path):
    """schemathesis generates requests from /docs.json (bounded, seeded, loopback only): every response, the
    400s and the event stream included, must match the published OpenAPI 3.0 spec, and none may be a 5xx."""
    done = subprocess.run([str(Path(sys.executable).with_name("st")), "run", f"{server}/docs.json",
                           "--max-examples", "25", "--seed", "1", "--workers", "1", "--request-timeout", "60"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its caches stay out of the repo
    assert done.returncode == 0, done.stdout[-6000:]
    assert "No issues found" in done.stdout


# Last in this file: starting another `bentoml serve` wipes BentoML's shared Prometheus folder
# (BENTOML_HOME/prometheus_multiproc_dir), so the servers started earlier report empty metrics afterwards.
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
