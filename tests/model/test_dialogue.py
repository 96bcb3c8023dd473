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


def test_a_growing_chat_keeps_its_prompt_start_for_several_turns_when_trimmed_in_steps(tmp_path):
    """Turn after turn of a chat over the budget: trimmed one turn at a time, every prompt starts differently (no
    prefix cache can help); four at a time (as the serving engines do), most prompts start with the whole of the
    previous prompt's context, and each still fits and ends with the newest turn."""
    from castbot.config.training import OfflineModelConfig
    from castbot.model.dialogue import DialogueFormat
    from castbot.model.folder import load_tokenizer
    from tasks.train.base_model import build_offline_model

    texts = [row["line"] for row in tiny_show_rows()]
    shape = OfflineModelConfig(architecture="llama", vocab_size=300, n_layer=1, n_embd=32, n_head=2)
    chat_tokenizer = load_tokenizer(str(build_offline_model(texts, shape, 0, tmp_path / "model")))
    fmt, budget = DialogueFormat("chat", "Ada", "The Tiny Show"), 400  # ~8 lines of this tiny tokenizer
    turns = [("" if i % 2 else "Ada", f"line {i} about the rocket and the moon") for i in range(40)]

    def kept_prefixes(step: int) -> int:
        prompts = [fmt.prompt_ids(chat_tokenizer, turns[:n], budget, step=step) for n in range(1, len(turns) + 1)]
        for n, ids in enumerate(prompts, 1):
            assert len(ids) <= budget and f"line {n - 1} about" in chat_tokenizer.decode(ids)
        def shared(before: list[int], now: list[int]) -> int:
            return next((i for i, (a, b) in enumerate(zip(before, now)) if a != b), min(len(before), len(now)))

        tail = len(prompts[0]) - shared(prompts[0], prompts[1])  # the template's tokens after the last line
        # the next prompt holds all of this one but that tail
        return sum(shared(before, now) >= len(before) - tail for before, now in zip(prompts, prompts[1:]))

    one_by_one, in_fours = kept_prefixes(1), kept_prefixes(4)
    assert in_fours >= 0.6 * (len(turns) - 1) and one_by_one <= 0.3 * (len(turns) - 1), (one_by_one, in_fours)
