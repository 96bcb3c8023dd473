"""castbot/telegram.py: replies fit Telegram's message limit."""

import pytest

pytestmark = pytest.mark.unit


def test_telegram_replies_are_split_at_telegrams_limit():
    from castbot.telegram import TELEGRAM_LIMIT, split_message

    text = ("word " * 2000).strip()
    pieces = split_message(text)
    assert len(pieces) == 3 and all(len(p) <= TELEGRAM_LIMIT for p in pieces)
    assert " ".join(pieces) == text and split_message("short") == ["short"]
