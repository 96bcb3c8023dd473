"""A cast model's liked turns (tasks/data/feedback.py): an approved turn of a member trains as that member's sample
(its system line names them), only after review, only from this model's log, and never for someone outside the cast;
each member's feedback is capped against that member's own lines."""

from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import tiny_config, write_tiny_show

CAST = ["Ada", "Bram", "Cleo"]
HISTORY = [("", "Is the rocket fuelled?"), ("Ada", "Half of it.")]


def liked(log, turn_id: str, character: str, model: str = "cast-feedback-bot", review: str | None = "approved",
          rating: int = 1, seconds: int = 0) -> None:
    from castbot.chatlog.store import TurnRecord

    log.record(TurnRecord(turn_id, f"conversation-{turn_id}", datetime.now(UTC) + timedelta(seconds=seconds), "chat",
                          f"And the rest, {turn_id}?", f"The numbers say {turn_id}.", 2, model, "1", character,
                          "transformers", 12, 5, 0.2, None, "stop", client="alice", history=HISTORY))
    assert log.add_feedback(turn_id, rating, None, client="alice")
    if review:
        assert log.set_review([turn_id], review) == [turn_id]


@pytest.mark.flow  # the training flow's data steps: Great Expectations, Prefect tasks
def test_an_approved_liked_turn_of_a_member_trains_as_that_member(tmp_path, prefect_harness):
    from castbot.chatlog.store import ChatLog
    from castbot.config.profile import characters
    from castbot.model.dialogue import IGNORE_INDEX
    from castbot.model.folder import load_tokenizer
    from flows.train import training_data, training_texts
    from tasks.data.feedback import feedback_samples, read_feedback, write_feedback_jsonl
    from tasks.data.tokenize import choose_format, tokenize_dialogues
    from tasks.train.base_model import prepare_base_model

    url = f"sqlite:///{tmp_path / 'chatlog.db'}"
    log = ChatLog(url)
    liked(log, "bram", "Bram")  # approved: trains as Bram
    liked(log, "cleo", "Cleo", review=None, seconds=1)  # liked, awaiting review
    liked(log, "dot", "Dot", seconds=2)  # approved, but Dot is not in this cast (an older model's member)
    liked(log, "rival", "Bram", model="rival-bot", seconds=3)  # approved, of another model
    liked(log, "ada", "Ada", rating=-1, review=None, seconds=4)  # disliked
    log.close()
    config = tiny_config(write_tiny_show(tmp_path / "show.csv"), show="The Tiny Show", **{
        "character": None, "cast": CAST, "offline_model.architecture": "llama", "offline_model.n_positions": 256,
        "dialogue.max_length": 96, "registry.model_name": "cast-feedback-bot",
        "data.feedback": {"enabled": True, "url": url, "max_share": 0.5}})

    data = training_data(config, str(tmp_path / "reports"))  # what flows.train runs, log read included
    [sample] = feedback_samples(data.splits["train"])
    assert (sample["turn_id"], sample["character"]) == ("bram", "Bram")
    assert sample["context"] == ["Is the rocket fuelled?", "Half of it.", "And the rest, bram?"]
    assert (data.feedback.added, data.feedback.pending, data.feedback.other_speakers) == (1, 1, 1)
    assert data.feedback.summary().endswith(", 1 said by characters this profile does not learn")
    assert '"character": "Bram"' in write_feedback_jsonl([sample], tmp_path / "artifacts").read_text()

    # tokenised as the flow tokenises: the system line names Bram, the loss falls on his reply
    base = prepare_base_model.fn(config.base_model, training_texts(data.splits["train"]), config.offline_model,
                                 config.training.seed)
    fmt = choose_format(base, config.dialogue, characters(config)[0], config.show)
    train = tokenize_dialogues.fn(data.splits, base, config.dialogue, fmt)["train"]
    row = train[data.splits["train"].index(sample)]
    tokenizer = load_tokenizer(base)
    text = tokenizer.decode(row["input_ids"])
    assert "You are Bram from The Tiny Show." in text and "You are Ada" not in text
    target = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX])
    assert target.startswith("The numbers say bram.")

    # review still decides: approved, Cleo's turn trains as Cleo; without require_review it would have already
    unreviewed = config.model_copy(update={"data": config.data.model_copy(update={
        "feedback": config.data.feedback.model_copy(update={"require_review": False})})})
    assert {(s["turn_id"], s["character"]) for s in read_feedback(unreviewed).samples} == {("bram", "Bram"),
                                                                                         ("cleo", "Cleo")}
    log = ChatLog(url)
    log.set_review(["cleo"], "approved")
    log.close()
    found = read_feedback(config)
    assert [(s["turn_id"], s["character"]) for s in found.samples] == [("bram", "Bram"), ("cleo", "Cleo")]
    assert found.pending == 0


@pytest.mark.unit
def test_each_members_feedback_is_capped_by_that_members_lines_and_strangers_are_left_out():
    """Bram speaks 4 training samples, Ada 40: at max_share 0.2 Bram takes 1 liked turn (his newest), Ada up to 10;
    a member the transcript did not put in the cast ({top: N}) takes none."""
    from tasks.data.feedback import FeedbackFound, merge_feedback

    def line(who: str, i: int, **more) -> dict:
        return {"episode": "E1", "context": ["Go?"], "speakers": [""], "response": f"{who} line {i}.",
                "character": who, **more}

    train = [line("Ada", i) for i in range(40)] + [line("Bram", i) for i in range(4)]
    splits = {"train": train, "validation": [line("Ada", 99)], "test": [line("Bram", 99)]}
    likes = [line(who, 100 + i, turn_id=f"{who}-{i}") for i in range(3) for who in ("Bram", "Ada", "Cleo")]
    added = merge_feedback(splits, FeedbackFound(likes), max_share=0.2)
    fed = added.splits["train"][len(train):]
    assert [s["turn_id"] for s in fed] == ["Ada-0", "Ada-1", "Bram-2", "Ada-2"]  # oldest first, Bram's newest
    assert (added.added, added.over_cap, added.other_speakers) == (4, 2, 3)
