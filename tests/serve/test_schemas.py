"""castbot/serve/schemas.py: the prompt built from a chat request, and the limits read from the environment."""

import pytest

pytestmark = pytest.mark.unit


def test_chat_prompt_puts_history_first_and_message_last():
    from castbot.serve.schemas import ChatRequest, chat_prompt

    request = ChatRequest(history=[{"speaker": "Bram", "text": "Fuel?"}, {"speaker": "Ada", "text": " Full. "}],
                          message="Then fly.", temperature=0)
    prompt = chat_prompt(request)
    assert prompt.named_turns() == [("Bram", "Fuel?"), ("Ada", "Full."), ("", "Then fly.")]
    assert prompt.temperature == 0 and prompt.max_new_tokens == 40


def test_limits_come_from_the_environment_and_bad_values_are_refused():
    from pydantic import ValidationError

    from castbot.serve.schemas import load_limits

    limits = load_limits({"CASTBOT_SERVE_MAX_CONCURRENCY": "7", "CASTBOT_SERVE_BATCHING": "false"})
    assert limits.max_concurrency == 7 and limits.batching is False
    with pytest.raises(ValidationError, match="max_new_tokens"):
        load_limits({"CASTBOT_SERVE_MAX_NEW_TOKENS": "0"})
