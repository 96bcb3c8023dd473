"""castbot/model/dialogue.py: how turns are joined, which labels are masked, how history is truncated."""

import pytest

from tests.conftest import tiny_show_rows

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from castbot.config.training import OfflineModelConfig
    from castbot.model.folder import load_tokenizer
    from tasks.train.base_model import build_offline_model

    texts = [row["line"] for row in tiny_show_rows()]
    folder = build_offline_model(texts, OfflineModelConfig(vocab_size=300, n_layer=1, n_embd=32, n_head=2),
                                 seed=0, folder=tmp_path_factory.mktemp("m") / "model")
    return load_tokenizer(str(folder))


def test_sample_joins_turns_with_eos_and_masks_context(tokenizer):
    from castbot.model.dialogue import IGNORE_INDEX, DialogueFormat

    sample = DialogueFormat().encode_sample(tokenizer, [("", "Hello there"), ("", "How are you")], "Fine thanks", 64)
    eos = tokenizer.eos_token_id
    assert sample["input_ids"].count(eos) == 3 and sample["input_ids"][-1] == eos
    n_response = len(tokenizer.encode("Fine thanks", add_special_tokens=False)) + 1
    assert sample["labels"][-n_response:] == sample["input_ids"][-n_response:]
    assert set(sample["labels"][:-n_response]) == {IGNORE_INDEX}
    assert tokenizer.decode(sample["input_ids"], skip_special_tokens=True).endswith("Fine thanks")


def test_truncation_drops_oldest_turns_never_the_response(tokenizer):
    from castbot.model.dialogue import DialogueFormat

    context = [("", f"old turn number {i} about the rocket") for i in range(30)]
    sample = DialogueFormat().encode_sample(tokenizer, context, "The newest answer", 40)
    text = tokenizer.decode(sample["input_ids"], skip_special_tokens=False)
    assert len(sample["input_ids"]) <= 40
    assert text.endswith("The newest answer" + tokenizer.eos_token)
    assert "old turn number 29" in text and "old turn number 0 " not in text


def test_loss_on_all_keeps_every_label(tokenizer):
    from castbot.model.dialogue import DialogueFormat

    sample = DialogueFormat().encode_sample(tokenizer, [("", "Hello")], "Hi", 32, loss_on="all")
    assert sample["labels"] == sample["input_ids"]
