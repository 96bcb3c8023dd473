"""The served Bento for the service tests: a tiny model trained by the real flow, built into a Bento, served by a
real `bentoml serve` on a free loopback port; and the HTTP helpers the tests share.

Each served process starts once per session (`server`, `adaptive_server`, `continuous_server`); a test that needs a
server of its own calls start_server. Starting any `bentoml serve` wipes BentoML's shared Prometheus folder
(BENTOML_HOME/prometheus_multiproc_dir): servers started earlier then report the newer ones' metrics, so tests that
read /metrics of `server` live in files that sort before the first file that starts another server.
"""

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

from tests.conftest import free_port, stop_process_group, tiny_config, write_tiny_show

# the served process's limits (CASTBOT_SERVE_*); small so the bad-input and overload cases are cheap
SERVER_LIMITS = {"max_message_chars": 200, "max_turn_chars": 200, "max_history_turns": 8, "max_new_tokens": 32,
                 "max_prompts": 4, "max_request_bytes": 8192, "max_concurrency": 24, "max_batch_size": 16,
                 "torch_threads": 1,
                 "dtype": "float32"}  # both engines in the same exact arithmetic, so greedy replies can be compared
BOT_CHAT = {"max_new_tokens": 8}
BIG = "x" * (SERVER_LIMITS["max_message_chars"] + 1)
BURSTS = (8, 16, 32)  # x max_concurrency: a fast engine can answer a small burst before it piles up past the limit
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


def start_server(bento: str, workdir: Path, engine: str = "auto", env: dict[str, str] | None = None,
                 **limits) -> tuple[str, subprocess.Popen]:
    """`bentoml serve BENTO` with the given engine (auto: the default) on a free loopback port, its conversation
    log in workdir; limits override SERVER_LIMITS, env (set last) adds or overrides environment variables.
    Returns (url, process); stop the process with stop_process_group."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **{f"CASTBOT_SERVE_{k.upper()}": str(v) for k, v in {**SERVER_LIMITS, **limits}.items()},
           "CASTBOT_SERVE_ENGINE": engine, "CASTBOT_CHATLOG_URL": f"sqlite:///{workdir / 'chatlog.db'}",
           # the Bento holds its OpenVINO export: serving must not need the exporter
           "CASTBOT_OPENVINO_EXPORTER": str(workdir / "no-exporter-here"), **(env or {})}
    CHATLOGS[url] = env["CASTBOT_CHATLOG_URL"]
    log = workdir / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("bentoml")), "serve", bento,
                                 "--host", "127.0.0.1", "--port", str(port)],
                                cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_ready(url, proc, log)
    return url, proc


def serve(bento: str, workdir: Path, engine: str = "auto", env: dict[str, str] | None = None, **limits):
    """start_server, stopped when the generator ends: `yield from serve(...)` in a fixture yields the URL."""
    url, proc = start_server(bento, workdir, engine, env, **limits)
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


def chat(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/chat", json=body, timeout=60)


def stream_events(url: str, body: dict, path: str = "/chat/stream") -> list[tuple[str, dict]]:
    """(event, data) pairs of one /chat/stream (or /scene) response."""
    events, name = [], "message"
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
            elif not line:
                name = "message"
    return events


def burst(url: str, n: int, **body) -> list[tuple[int, float, dict]]:
    """n /chat calls sent at once from one event loop: (status, seconds, body) each."""
    async def run() -> list[tuple[int, float, dict]]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:
            async def one(i: int) -> tuple[int, float, dict]:
                start = time.monotonic()
                resp = await client.post(f"{url}/chat",
                                         json={"message": f"Is the rocket ready for flight {i}?", **body})
                return resp.status_code, time.monotonic() - start, resp.json()

            return await asyncio.gather(*(one(i) for i in range(n)))

    return asyncio.run(run())


def metric(url: str, name: str) -> float:
    """One sample from /metrics (BentoML's multiprocess metrics may label it with the worker's pid)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    [value] = [float(line.split()[-1]) for line in text.splitlines() if re.match(rf"{name}(\{{[^}}]*\}})? ", line)]
    return value


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
