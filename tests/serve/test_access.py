"""API keys and per-client rate limits, as functions (tests/serve/test_public.py drives them over HTTP)."""

import pytest

from castbot.serve.access import AccessConfigError, RateLimit, RateLimiter, client_of, keys_from_env, parse_keys

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
