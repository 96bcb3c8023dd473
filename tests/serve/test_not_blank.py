"""The published "not blank" rule reads the same in JSON Schema (ECMA-262), pydantic-core and Python's re."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from pydantic import ValidationError

from castbot.serve.schemas import NOT_BLANK, ChatRequest

pytestmark = pytest.mark.unit

# ECMA-262's WhiteSpace and LineTerminator (what \s means to a JSON Schema validator) and Python's str.isspace()
ECMA_SPACES = "\t\n\v\f\r \xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000\ufeff"
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
