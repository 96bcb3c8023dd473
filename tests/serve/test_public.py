"""In front of the public: API keys, per-client limits, ownership of conversations, refusals every client can read,
and /livez while long chats run; a real `bentoml serve` of the tiny Bento with four keys (tests/serve/conftest.py)."""

import asyncio
import json
import time
import urllib.error
import urllib.request

import httpx
import pytest

from tests.serve.conftest import logged_turns, serve

pytestmark = pytest.mark.service

KEYS = {"alice": "alice-key-1", "bob": "bob-key-2", "carol": "carol-key-3", "dave": "dave-key-4"}
LIMIT = 8  # requests per hour per client: nothing refills while the tests run


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def public(trained, tmp_path_factory) -> str:
    """The tiny Bento with four keys and a rate limit of LIMIT requests an hour per client."""
    env = {"CASTBOT_API_KEYS": ",".join(f"{name}:{key}" for name, key in KEYS.items()),
           "CASTBOT_RATE_LIMIT": f"{LIMIT}/hour"}
    yield from serve(trained["bento"], tmp_path_factory.mktemp("public"), "auto", env, max_prompts=LIMIT)


def chat(url: str, who: str | None, **body) -> httpx.Response:
    return httpx.post(f"{url}/chat", json={"max_new_tokens": 4, **body}, headers=auth(who) if who else None,
                      timeout=60)


def test_without_a_valid_key_every_api_route_answers_401_and_probes_stay_open(public):
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS["alice"]}):
        refused = httpx.post(f"{public}/chat", json={"message": "hi"}, headers=headers, timeout=30)
        assert refused.status_code == 401 and refused.json()["field"] == "Authorization", refused.text
        assert refused.headers["www-authenticate"] == "Bearer"
        openai = httpx.post(f"{public}/v1/chat/completions", headers=headers, timeout=30,
                            json={"model": "serve-bot", "messages": [{"role": "user", "content": "hi"}]})
        assert openai.status_code == 401 and openai.json()["error"]["code"] == "invalid_api_key", openai.text
        assert httpx.get(f"{public}/v1/models", headers=headers, timeout=30).status_code == 401
        for route in ("/feedback", "/generate"):
            assert httpx.post(f"{public}{route}", json={}, headers=headers, timeout=30).status_code == 401
        assert httpx.delete(f"{public}/conversations/abc", headers=headers, timeout=30).status_code == 401
    for probe in ("/livez", "/readyz", "/metrics", "/ui/"):
        assert httpx.get(f"{public}{probe}", timeout=30).status_code == 200, probe


def test_a_key_names_its_client_who_alone_may_add_to_rate_and_delete_its_conversation(public):
    first = chat(public, "alice", message="Is the rocket ready?")
    assert first.status_code == 200, first.text
    mine = first.json()
    second = chat(public, "alice", message="And the fuel?", conversation_id=mine["conversation_id"])
    assert second.status_code == 200

    # bob cannot write into alice's conversation, rate its turns, or delete it; nor learn that they exist
    forged = chat(public, "bob", message="I'm alice now", conversation_id=mine["conversation_id"])
    assert forged.status_code == 409 and "another client" in forged.text, forged.text
    rated = httpx.post(f"{public}/feedback", json={"turn_id": mine["turn_id"], "rating": 1}, headers=auth("bob"),
                       timeout=30)
    unknown = httpx.post(f"{public}/feedback", json={"turn_id": "f" * 32, "rating": 1}, headers=auth("bob"),
                         timeout=30)
    assert rated.status_code == unknown.status_code == 404
    assert rated.json()["error"].replace(mine["turn_id"], "ID") == unknown.json()["error"].replace("f" * 32, "ID")
    taken = httpx.delete(f"{public}/conversations/{mine['conversation_id']}", headers=auth("bob"), timeout=30)
    assert taken.status_code == 404

    # alice rates her turn twice: one rating is kept, the latest
    for rating in (1, -1):
        saved = httpx.post(f"{public}/feedback", json={"turn_id": mine["turn_id"], "rating": rating},
                           headers=auth("alice"), timeout=30)
        assert saved.status_code == 200, saved.text
    turns = logged_turns(public).set_index("turn_id")
    assert turns.loc[mine["turn_id"], "client"] == "alice" and turns.loc[mine["turn_id"], "rating"] == -1
    assert list(turns.index).count(mine["turn_id"]) == 1

    gone = httpx.delete(f"{public}/conversations/{mine['conversation_id']}", headers=auth("alice"), timeout=30)
    assert gone.status_code == 200 and gone.json()["deleted_turns"] == 2, gone.text
    left = logged_turns(public)
    assert mine["conversation_id"] not in set(left.conversation_id)
    again = httpx.post(f"{public}/feedback", json={"turn_id": mine["turn_id"], "rating": 1}, headers=auth("alice"),
                       timeout=30)
    assert again.status_code == 404


def test_one_clients_burst_is_limited_without_throttling_another(public):
    # a /generate of N prompts spends N of carol's allowance: admission counts prompts, not requests
    prompts = [{"turns": [f"prompt {i}"], "max_new_tokens": 2} for i in range(LIMIT - 2)]
    spent = httpx.post(f"{public}/generate", json={"prompts": prompts}, headers=auth("carol"), timeout=60)
    assert spent.status_code == 200, spent.text
    codes = [chat(public, "carol", message=f"again {i}").status_code for i in range(3)]
    assert codes == [200, 200, 429], codes
    limited = chat(public, "carol", message="once more")
    assert limited.status_code == 429 and 60 <= int(limited.headers["retry-after"]) <= 3600
    assert "CASTBOT_RATE_LIMIT" in limited.json()["error"]
    openai = httpx.post(f"{public}/v1/chat/completions", headers=auth("carol"), timeout=30,
                        json={"model": "serve-bot", "messages": [{"role": "user", "content": "hi"}]})
    assert openai.status_code == 429 and openai.json()["error"]["code"] == "rate_limit_exceeded"
    assert chat(public, "dave", message="my turn").status_code == 200  # dave's own allowance is untouched


@pytest.mark.parametrize("megabytes", [1, 5])
def test_an_oversized_body_is_a_413_every_client_reads(public, megabytes):
    """urllib sends the whole body before reading: the server must drain it, not close on it (a broken pipe)."""
    body = json.dumps({"message": "x" * (megabytes * 2**20)}).encode()
    for _ in range(3):
        request = urllib.request.Request(f"{public}/chat", data=body, method="POST",
                                         headers={"Content-Type": "application/json", **auth("dave")})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 413 and b"CASTBOT_SERVE_MAX_REQUEST_BYTES" in refused.value.read()


def test_livez_answers_within_a_second_while_48_long_history_chats_run(trained, tmp_path):
    """The most history a request may send (about 50 KB) from 48 clients at once: the event loop stays free."""
    limits = {"max_history_turns": 50, "max_turn_chars": 1000, "max_request_bytes": 65536, "max_concurrency": 64}
    text = ("so the portal gun needs fluid and the council wants it back by tuesday " * 15)[:1000]
    body = {"history": [{"speaker": "user" if i % 2 else "bot", "text": text} for i in range(50)],
            "message": "what now?", "max_new_tokens": 4}
    assert len(json.dumps(body)) > 50_000

    async def load(url: str) -> tuple[list[int], list[float]]:
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=60)) as http:
            task = asyncio.ensure_future(asyncio.gather(*(http.post("/chat", json=body) for _ in range(48))))
            probes = []
            while not task.done():
                started = time.monotonic()
                assert (await http.get("/livez")).status_code == 200
                probes.append(time.monotonic() - started)
                await asyncio.sleep(0.05)
            return [r.status_code for r in task.result()], probes

    for url in serve(trained["bento"], tmp_path, "auto", None, **limits):
        codes, probes = asyncio.run(load(url))
    assert codes == [200] * 48
    assert len(probes) >= 3 and max(probes) < 1.0, f"/livez took up to {max(probes):.2f} s ({len(probes)} probes)"
