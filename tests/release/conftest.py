"""Tiny models of both families for the Bot, engine and export tests (GPT-2 with eos-joined turns, Llama with a
chat template), built once per session, and the greedy decoding they are checked against: no flow, no Bento."""

import math

import pytest

from castbot.config.training import OfflineModelConfig
from castbot.model.bot import Bot
from castbot.model.dialogue import DialogueFormat
from tests.conftest import WORDS

TEXTS = [" ".join(WORDS[i:i + 6]) for i in range(len(WORDS) - 6)] * 3


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def bot(request, tmp_path_factory):
    import torch

    from tasks.train.base_model import build_offline_model

    shape = OfflineModelConfig(architecture=request.param, vocab_size=300, n_layer=2, n_embd=32, n_head=2,
                               n_positions=128)
    folder = build_offline_model(TEXTS, shape, seed=0, folder=tmp_path_factory.mktemp(request.param) / "model")
    style = "chat" if request.param == "llama" else "eos"
    torch.manual_seed(0)
    return Bot.load(str(folder), fmt=DialogueFormat(style, "Ada", "The Tiny Show"), max_length=96)


@pytest.fixture(scope="session")
def eos_bot(tmp_path_factory):
    from tasks.train.base_model import build_offline_model

    shape = OfflineModelConfig(vocab_size=300, n_layer=1, n_embd=32, n_head=2, n_positions=128)
    return Bot.load(str(build_offline_model(TEXTS, shape, seed=0, folder=tmp_path_factory.mktemp("eos") / "m")))


def argmax_reply(bot: Bot, prompt: list[int], max_new: int) -> list[int]:
    """Greedy decoding written out: the likeliest next token, never end-of-turn first, stop at end-of-turn."""
    import torch

    ids, eos, new = list(prompt), bot.tokenizer.eos_token_id, []
    with torch.inference_mode():
        for step in range(max_new):
            logits = bot.model(input_ids=torch.tensor([ids])).logits[0, -1]
            if step == 0:
                logits[eos] = -math.inf  # min_new_tokens=1: a reply is never empty
            token = int(logits.argmax())
            new.append(token)
            ids.append(token)
            if token == eos:
                break
    return new


GREEDY = {"temperature": 0, "no_repeat_ngram_size": 0, "max_new_tokens": 12}
CHATS = [[("Bram", "the rocket needs fuel")], [("Cleo", "science is never simple"), ("Ada", "the answer"),
                                                ("", "is always in the numbers before we fly to the moon")]]

