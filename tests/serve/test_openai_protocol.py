"""castbot/serve/openai_protocol.py: stop strings in a stream."""

import pytest

pytestmark = pytest.mark.unit


def test_openai_stop_strings_are_cut_in_a_stream_without_sending_a_partial_stop():
    from castbot.serve.openai_protocol import StopCutter, cut_at_stop

    cutter = StopCutter(["END"])
    sent = [cutter.feed(piece) for piece in ["hello E", "N", "D and more"]]
    assert "".join(sent) == "hello " and cutter.stopped and cutter.flush() == ""
    cutter = StopCutter(["END"])
    assert "".join([cutter.feed("ab E"), cutter.feed("x")]) + cutter.flush() == "ab Ex"
    assert cut_at_stop("a. b", [".", "b"]) == ("a", True) and cut_at_stop("ab", ["x"]) == ("ab", False)
