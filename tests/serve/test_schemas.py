"""castbot/serve/schemas.py: the prompt built from a chat request, the limits read from the environment, and the
published "not blank" rule, which JSON Schema (ECMA-262), pydantic-core and Python's re read alike."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from pydantic import ValidationError

from castbot.serve.schemas import NOT_BLANK, ChatRequest

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


# ECMA-262's WhiteSpace and LineTerminator (what \s means to a JSON Schema validator) and Python's str.isspace()
ECMA_SPACES = ("\t\n\v\f\r \xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
               + "\u2028\u2029\u202f\u205f\u3000\ufeff")
PYTHON_SPACES = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())
SAMPLES = [c for c in ECMA_SPACES + PYTHON_SPACES] + ["\u200b", "a", " a ", "\x85a", "\ufeff\u3000x"]


def test_every_space_of_either_reader_alone_is_blank_and_anything_else_is_not():
    for text in SAMPLES:
        blank = all(c in ECMA_SPACES or c in PYTHON_SPACES for c in text)
        assert (re.search(NOT_BLANK, text) is None) == blank, repr(text)
        try:
            ChatRequest(message=text)
            accepted = True
        except ValidationError:
            accepted = False
        assert accepted == (not blank), repr(text)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: the ECMA-262 reading is not run")
def test_an_ecma_262_engine_reads_the_published_pattern_alike():
    script = ("const [p, texts] = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
              "console.log(JSON.stringify(texts.map(t => new RegExp(p).test(t))));")
    out = subprocess.run(["node", "-e", script], input=json.dumps([NOT_BLANK, SAMPLES]), capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == [re.search(NOT_BLANK, t) is not None for t in SAMPLES]


def test_a_scene_costs_a_request_of_the_rate_limit_per_line_and_one_place_in_flight():
    from castbot.serve.admission import costs

    assert costs("/scene", b'{"characters": ["Rick"], "opening": "Hi", "turns": 8}') == (1, 8)
    assert costs("/scene", b'{"characters": ["Rick"], "opening": "Hi"}') == (1, 6)  # the default length
    assert costs("/generate", b'{"prompts": [{"turns": ["a"]}, {"turns": ["b"]}]}') == (2, 2)
    assert costs("/chat", b'{"message": "Hi"}') == (1, 1)
    assert costs("/scene", b"not json") == (1, 1)  # refused later, by the route's validation


def test_a_scene_request_is_bounded_like_a_chat():
    from pydantic import ValidationError

    from castbot.serve.schemas import LIMITS, SceneRequest

    SceneRequest.model_validate({"characters": ["Rick", "Morty"], "opening": {"speaker": "Jerry", "text": "Hi"}})
    assert SceneRequest.model_validate({"opening": "Hi"}).characters == []  # the whole cast
    for bad in ({"characters": [""], "opening": "Hi"}, {"characters": ["Rick"], "opening": " "},
                {"characters": ["Rick"], "opening": "Hi", "turns": LIMITS.max_scene_turns + 1},
                {"characters": ["Rick"], "opening": "Hi", "character": "Rick"}):
        with pytest.raises(ValidationError):
            SceneRequest.model_validate(bad)
