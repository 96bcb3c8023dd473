"""The service's clients against the served Bento: the terminal chat, the Telegram bot (against a fake Bot API
server), the web page in headless Chromium, and schemathesis' requests generated from the published spec."""

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CHARACTER, REPO, free_port, stop_process_group
from tests.serve.conftest import SERVER_LIMITS, logged_turns

pytestmark = pytest.mark.service


def test_terminal_chat_keeps_the_history(server):
    done = subprocess.run([sys.executable, "-m", "castbot.chat", "--url", server, "--verbose", "--max-new-tokens", "6"],
                          input="Is the rocket ready?\nAnd the moon?\n/quit\n", capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    replies = [line for line in done.stdout.splitlines() if line.startswith(f"{CHARACTER}> ")]
    sizes = [int(n) for n in re.findall(r"prompt (\d+) tokens", done.stdout)]
    assert len(replies) == 2 and len(sizes) == 2
    assert sizes[1] > sizes[0]  # the second prompt carries the first exchange


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
        entities = ([{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}] if text.startswith("/")
                    else [])
        with self.lock:
            self.next_message += 1
            self.updates.append({"update_id": self.next_update, "message": {
                "message_id": self.next_message, "date": int(time.time()), "text": text, "entities": entities,
                "chat": {"id": chat_id, "type": "private"},
                "from": {"id": chat_id, "is_bot": False, "first_name": "U"}}})
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


def test_telegram_bot_keeps_each_chats_history_and_forgets_it_on_the_service(server, bot_api, tmp_path):
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
        before = logged_turns(server).set_index("message")
        first, second = (before.loc[f"Telegram: {m}"] for m in ("is the rocket ready?", "and the moon?"))
        assert (first.history_turns, second.history_turns) == (0, 2)
        assert second.conversation_id == first.conversation_id  # one conversation per chat
        bot_api.send(1, "/forget")
        bot_api.send(1, "Telegram: fresh start?")
        bot_api.send(1, "x" * (SERVER_LIMITS["max_message_chars"] + 1))  # over the service's limit
        replies = bot_api.wait_replies(1, 6)
        assert replies[3].startswith("Forgotten") and "deleted" in replies[3] and "too long" in replies[5]
    finally:
        stop_process_group(proc)
    turns = logged_turns(server).set_index("message")
    assert first.conversation_id not in set(turns.conversation_id)  # /forget deleted it on the service
    fresh = turns.loc["Telegram: fresh start?"]
    assert fresh.history_turns == 0 and fresh.conversation_id != first.conversation_id
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

    # the page shows the conversation's id and deletes it on the service
    shown = browser.eval("document.getElementById('conversation').textContent")
    [conversation] = set(rated.conversation_id)
    assert shown == f"Conversation {conversation}"
    browser.eval("window.confirm = () => true; document.getElementById('delete').click()")
    browser.wait_for("document.querySelector('.turn.bot') && "
                     "document.querySelector('.turn.bot').textContent.includes('This conversation is deleted')")
    assert conversation not in set(logged_turns(server).conversation_id)


# ---- schemathesis against the published spec ----------------------------------------------------------------


@pytest.mark.parametrize("mode, examples", [("all", 25), ("positive", 60)])
def test_the_published_spec_holds_for_every_response_schemathesis(server, tmp_path, mode, examples):
    """schemathesis generates requests from /docs.json (bounded, seeded, loopback only): every response, the
    400s and the event stream included, must match the published OpenAPI 3.0 spec, and none may be a 5xx. In
    positive mode every generated request is valid by the spec, so a 400 means the server and the spec disagree
    (a text such as U+0085 alone once did)."""
    done = subprocess.run([str(Path(sys.executable).with_name("st")), "run", f"{server}/docs.json", "--mode", mode,
                           "--max-examples", str(examples), "--seed", "1", "--workers", "1", "--request-timeout", "60"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its caches stay out of the repo
    assert done.returncode == 0, done.stdout[-6000:]
    assert "No issues found" in done.stdout, done.stdout[-6000:]

