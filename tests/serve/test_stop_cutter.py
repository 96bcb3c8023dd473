"""castbot/serve/openai_protocol.py: StopCutter sends what the old rescan-everything cutter sent (kept in
bench/prompt_build.py), holds back less than the longest stop string, and stop strings are bounded as OpenAI's."""

import random

import pytest

from bench.prompt_build import OldStopCutter
from castbot.serve.openai_protocol import MAX_STOP_CHARS, MAX_STOPS, OpenAIError, StopCutter, parse_request

pytestmark = pytest.mark.unit


def random_stream(rng: random.Random, alphabet: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Up to four stop strings (an empty one now and then) and a stream of feeds and flushes."""
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0 if rng.random() < 0.02 else 1, 7)))
             for _ in range(rng.randint(0, 4))]
    steps = [("flush", "") if rng.random() < 0.1 else
             ("feed", "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))))
             for _ in range(rng.randint(0, 14))]
    return stops, steps


def test_the_cutter_sends_what_the_old_cutter_sent_on_random_streams():
    rng = random.Random(28)
    stopped = 0
    for trial in range(5000):
        alphabet = "ab" if trial % 2 else "abc "  # a small alphabet: overlapping partial matches are common
        stops, steps = random_stream(rng, alphabet)
        old, new = OldStopCutter(stops), StopCutter(stops)
        for action, piece in steps:
            sent = (old.flush(), new.flush()) if action == "flush" else (old.feed(piece), new.feed(piece))
            assert sent[0] == sent[1] and old.stopped == new.stopped and old.sent == new.sent, (stops, steps)
        assert old.flush() == new.flush() and old.text == new.text
        stopped += new.stopped
    assert 1000 < stopped < 4000, "the streams should both hit and miss their stop strings"


def test_only_a_tail_shorter_than_the_longest_stop_string_is_held_back():
    stops = ["ab" * 200 + "c", "x" * 300]
    cutter, sent = StopCutter(stops), ""
    for _ in range(2000):
        sent += cutter.feed("ab")
        assert len(cutter.text) - cutter.sent < max(map(len, stops))
    sent += cutter.feed("c tail")
    assert cutter.stopped and sent == "ab" * 1800 and cutter.flush() == ""


def test_a_stop_string_split_across_many_pieces_is_cut_and_never_sent():
    cutter = StopCutter(["<END>", "zz"])
    sent = [cutter.feed(piece) for piece in ["hello <", "E", "N", "D", ">", " more"]]
    assert "".join(sent) == "hello " and cutter.stopped and cutter.text == "hello <END> more"


def request(stop) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": stop}


@pytest.mark.parametrize("stop, param, limit", [
    (["a"] * (MAX_STOPS + 1), "stop.list", f"at most {MAX_STOPS} items"),
    ("x" * (MAX_STOP_CHARS + 1), "stop.str", f"at most {MAX_STOP_CHARS} characters"),
    (["ok", "x" * (MAX_STOP_CHARS + 1)], "stop.list.1", f"at most {MAX_STOP_CHARS} characters"),
])
def test_too_many_or_too_long_stop_strings_are_refused_naming_the_limit(stop, param, limit):
    with pytest.raises(OpenAIError) as refusal:
        parse_request(request(stop))
    assert refusal.value.status == 400 and refusal.value.param == param and limit in refusal.value.message


def test_stop_strings_within_the_limits_are_accepted():
    assert parse_request(request(["x" * MAX_STOP_CHARS] * MAX_STOPS)).stop == ["x" * MAX_STOP_CHARS] * MAX_STOPS
    assert parse_request(request("###")).stop == "###" and parse_request(request(None)).stop is None
    assert MAX_STOPS == 4  # as OpenAI
