"""API keys and per-client rate limits, as functions (tests/serve/test_public.py drives them over HTTP)."""

import asyncio

import pytest

from castbot.serve.access import AccessConfigError, RateLimit, RateLimiter, client_of, keys_from_env, parse_keys
from castbot.serve.admission import Admission

pytestmark = pytest.mark.unit


def test_keys_name_their_clients_from_the_variable_and_the_file(tmp_path):
    secret = tmp_path / "keys"
    secret.write_text("telegram:tg-key\n# a comment\nweb:web-key\n")
    keys = keys_from_env({"CASTBOT_API_KEYS": "alice:a-key, bob:b-key", "CASTBOT_API_KEYS_FILE": str(secret)})
    assert keys == {"a-key": "alice", "b-key": "bob", "tg-key": "telegram", "web-key": "web"}
    assert client_of(keys, "Bearer b-key") == "bob"
    assert client_of(keys, "bearer  web-key ") == "web"
    assert client_of(keys, "Bearer b-ke") is None
    assert client_of(keys, "Basic b-key") is None
    assert client_of(keys, None) is None
    assert keys_from_env({}) == {}


@pytest.mark.parametrize("text, problem", [
    ("alice", "entry 1 is not name:key"),
    ("alice:", "entry 1 is not name:key"),
    ("alice:k1,alice:k2", "'alice' is given twice"),
    ("alice:k1,bob:k1", "two names share one key"),
])
def test_a_bad_key_list_is_refused_without_showing_a_key(text, problem):
    with pytest.raises(AccessConfigError, match=problem) as error:
        parse_keys(text, "CASTBOT_API_KEYS")
    assert "k1" not in str(error.value) and "k2" not in str(error.value)


def test_an_unreadable_keys_file_names_the_variable(tmp_path):
    with pytest.raises(AccessConfigError, match="CASTBOT_API_KEYS_FILE: cannot read"):
        keys_from_env({"CASTBOT_API_KEYS_FILE": str(tmp_path / "missing")})


def test_rate_limits_parse_and_refuse_nonsense():
    assert RateLimit.parse("30/minute") == RateLimit(30, 60.0)
    assert RateLimit.parse("5/seconds") == RateLimit(5, 1.0)
    for bad in ("30", "0/minute", "x/minute", "30/fortnight"):
        with pytest.raises(AccessConfigError, match="CASTBOT_RATE_LIMIT"):
            RateLimit.parse(bad)


def test_one_clients_burst_does_not_throttle_another():
    now = [0.0]
    limiter = RateLimiter(RateLimit(3, 60.0), clock=lambda: now[0])
    assert [limiter.take("greedy") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take("greedy")
    assert wait == pytest.approx(20.0)  # one request refills every 60/3 s
    assert limiter.take("polite") == 0.0
    now[0] = 20.0
    assert limiter.take("greedy") == 0.0
    assert limiter.take("greedy") > 0


def test_a_request_of_many_prompts_costs_as_many():
    limiter = RateLimiter(RateLimit(10, 1.0), clock=lambda: 0.0)
    assert limiter.take("batch", cost=8) == 0.0
    assert limiter.take("batch", cost=4) == pytest.approx(0.2)
    assert limiter.take("batch", cost=2) == 0.0


def test_idle_clients_are_forgotten_and_busy_ones_kept():
    """Memory holds the clients of the last period only: 5,000 addresses that came once are dropped once a period
    has passed, while a client that spent its allowance is still held to it."""
    now = [0.0]
    limiter = RateLimiter(RateLimit(3, 60.0), clock=lambda: now[0])
    for i in range(5000):
        limiter.take(f"address:10.0.{i // 256}.{i % 256}")
    assert limiter.held() == 5000
    now[0] = 61.0
    for _ in range(3):
        limiter.take("greedy")
    for i in range(10_000):  # other traffic, 100 clients: the idle buckets are swept on the way
        limiter.take(f"address:198.51.100.{i % 100}")
    assert limiter.held() == 101
    assert limiter.take("greedy") > 0  # the busy client kept its empty bucket
    now[0] = 200.0
    for i in range(6000):
        limiter.take(f"address:192.0.2.{i % 200}")
    assert limiter.held() == 200  # only this period's clients remain


def scope(host: str, authorization: bytes | None = None) -> dict:
    return {"type": "http", "path": "/chat", "method": "POST", "client": (host, 50000),
            "headers": [(b"content-type", b"application/json")] + ([(b"authorization", authorization)]
                                                                    if authorization else [])}


async def answered(door: Admission, host: str) -> int:
    """The status a /chat from `host` gets at the door (the app behind it answers 200)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b'{"message": "hi"}', "more_body": False}

    async def send(message):
        sent.append(message)

    await door(scope(host), receive, send)
    return sent[0]["status"]


async def app(scope, receive, send):
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def test_an_open_service_limits_an_ipv6_host_by_its_64():
    door = Admission(app, max_concurrency=4, max_request_bytes=1024, rate_limit=RateLimit(2, 3600.0))  # no keys
    assert door.client(scope("2001:db8:1:2::7")) == door.client(scope("2001:db8:1:2:aaaa:bbbb:cccc:dddd")) \
        == "address:2001:db8:1:2::/64"
    assert door.client(scope("203.0.113.9")) == "address:203.0.113.9"  # IPv4 as before
    assert door.client(scope("::ffff:203.0.113.9")) == "address:203.0.113.9"  # not every IPv4 client in one /64

    async def main() -> list[int]:
        rotating = [await answered(door, f"2001:db8:1:2::{i:x}") for i in range(1, 4)]
        return rotating + [await answered(door, "2001:db8:1:3::1"), await answered(door, "203.0.113.9")]

    # a host rotating addresses inside its /64 is one client; the next /64 and an IPv4 client are others
    assert asyncio.run(main()) == [200, 200, 429, 200, 200]
    keyed = Admission(app, max_concurrency=4, max_request_bytes=1024, keys={"k3y": "web"})
    assert keyed.client(scope("2001:db8::1", b"Bearer k3y")) == "web"
