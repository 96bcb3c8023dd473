"""Liked turns train only once approved: the review queue, its command line, and the samples the training flow reads
(tasks/data/feedback.py)."""

import json
from datetime import timedelta

import pytest

from castbot.chatlog import ChatLog
from tasks.data.feedback import (
    add_approved_feedback,
    add_feedback_samples,
    feedback_cap,
    liked_samples,
    read_feedback,
    read_liked_samples,
    write_feedback_jsonl,
)
from tests.chatlog.conftest import NOW, cli, turn
from tests.conftest import tiny_config

pytestmark = pytest.mark.unit

HISTORY = [("", "Is the rocket fuelled?"), ("Ada", "Half of it."), ("", "And the rest?")]


def rated(log: ChatLog, name: str, rating: int | None, finish: str = "stop", **changes) -> str:
    fields = {"message": f"Ready, {name}?", "reply": f"Yes, {name}.", "history": HISTORY, **changes}
    log.record(turn(turn_id=name, conversation=name, client="alice", finish_reason=finish, **fields))
    if rating:
        assert log.add_feedback(name, rating, None, client="alice")
    return name


def test_only_liked_complete_turns_wait_for_review_and_only_they_can_be_approved(log):
    for name, rating, finish in [("liked", 1, "stop"), ("cut", 1, "cancelled"), ("disliked", -1, "stop"),
                                 ("unrated", None, "stop"), ("other", 1, "length")]:
        rated(log, name, rating, finish)
    assert list(log.pending_reviews()["turn_id"]) == ["liked", "other"]
    assert list(log.pending_reviews(limit=1)["turn_id"]) == ["liked"]
    assert log.set_review(["liked", "disliked", "unrated", "nope"], "approved") == ["liked"]
    assert log.set_review(["other"], "rejected") == ["other"]
    assert log.pending_reviews().empty
    with pytest.raises(ValueError, match="review state must be one of pending, approved, rejected"):
        log.set_review(["liked"], "maybe")


def test_the_review_command_shows_the_context_and_records_decisions(log):
    rated(log, "liked", 1)
    rated(log, "liked-too", 1, model_name="rick-bot")
    url = str(log.url)
    listing = cli("review", url=url)
    assert listing.returncode == 0, listing.stderr
    assert "turn liked " in listing.stdout and "client alice" in listing.stdout
    assert "  user: Is the rocket fuelled?\n  Ada: Half of it.\n  user: And the rest?\n  user: Ready, liked?\n" \
           "  -> Ada: Yes, liked." in listing.stdout  # the history that produced the reply, then the reply
    assert "2 liked turns await review" in listing.stdout
    assert "turn liked-too" not in cli("review", "--model", "ada-bot", url=url).stdout

    decided = cli("review", "--approve", "liked", "--reject", "liked-too", "no-such-turn", url=url)
    assert decided.returncode == 1  # one id was not a liked turn
    assert "approved 1 turns" in decided.stdout and "rejected 1 turns" in decided.stdout
    assert "not a liked turn in the log: no-such-turn" in decided.stderr
    assert dict(zip(log.turns()["turn_id"], log.turns()["review"])) == {"liked": "approved", "liked-too": "rejected"}
    assert "no liked turns await review" in cli("review", url=url).stdout


def test_approved_samples_keep_their_history_once_each(log):
    rated(log, "first", 1)
    rated(log, "again", 1, when=NOW + timedelta(seconds=1))  # the same context and reply as "first" once normalised
    rated(log, "pending", 1, when=NOW + timedelta(seconds=2))
    log.set_review(["first", "again"], "approved")
    frame = log.turns()
    frame.loc[frame["turn_id"] == "again", ["message", "reply"]] = ["Ready,\n first?", "Yes,  first.\n"]
    samples = liked_samples(frame)
    assert samples == [{"episode": "feedback:first", "context": [*(t for _, t in HISTORY), "Ready, first?"],
                        "speakers": ["", "Ada", "", ""], "response": "Yes, first.", "turn_id": "first",
                        "client": "alice"}]
    assert liked_samples(frame, context_turns=2)[0]["context"] == ["And the rest?", "Ready, first?"]
    assert liked_samples(frame, context_turns=0)[0]["context"] == ["Ready, first?"]  # the message always stays
    unreviewed = liked_samples(frame, require_review=False)  # data.feedback.require_review: false
    assert [s["turn_id"] for s in unreviewed] == ["first", "pending"]
    frame.loc[frame["turn_id"] == "first", "character"] = "Bram"  # a cast model's member answered
    [cast_sample] = liked_samples(frame, cast=True)
    assert cast_sample["character"] == "Bram"  # trains the member who said it, not the cast's first


def test_the_cap_keeps_feedback_within_its_share_of_the_training_split():
    assert feedback_cap(100, 0.2) == 25  # 25 of 125 = 20 %
    assert feedback_cap(4, 0.2) == 1 and feedback_cap(3, 0.2) == 0
    assert feedback_cap(10, 0.0) == 0 and feedback_cap(10, 1.0) > 10**6


def test_the_flow_task_adds_approved_turns_counts_the_rest_and_caps_them(log, tmp_path):
    for i in range(6):
        rated(log, f"liked-{i}", 1, when=NOW + timedelta(seconds=i))
    rated(log, "held-out", 1, reply="Test line.")
    log.set_review([f"liked-{i}" for i in range(4)] + ["held-out"], "approved")
    train = [{"episode": "E1", "context": ["Go?"], "response": f"Line {i}."} for i in range(12)]
    test = [{"episode": "E2", "context": ["Go?"], "response": "Test line."}]
    splits = {"train": train, "validation": [], "test": test}
    config = tiny_config("show.csv", **{"data.feedback": {"enabled": True, "url": str(log.url)}})

    added = add_approved_feedback.fn(splits, config)
    assert (added.added, added.pending, added.held_out, added.over_cap) == (3, 2, 1, 1)  # cap: 3 of 15 = 20 %
    fed = added.splits["train"][12:]
    assert [s["turn_id"] for s in fed] == ["liked-1", "liked-2", "liked-3"]  # the newest within the cap
    assert added.splits["test"] == splits["test"] and added.splits["train"][:12] == train
    assert "3 feedback samples added to training, 2 liked turns await review" in added.summary()
    assert add_feedback_samples.fn(splits, config)["train"] == added.splits["train"]
    found = read_feedback(config)  # read once by the flow, passed on
    assert (len(found.samples), found.pending) == (5, 2) and read_liked_samples(config) == found.samples
    assert add_approved_feedback.fn(splits, config, found) == added
    assert add_feedback_samples.fn(splits, config, found.samples) == added.splits
    assert add_feedback_samples.fn(splits, tiny_config("show.csv")) == splits  # off by default

    path = write_feedback_jsonl(fed, tmp_path / "artifacts")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["turn_id"] for r in rows] == ["liked-1", "liked-2", "liked-3"]
    assert rows[0]["client"] == "alice" and rows[0]["context"][-1] == "Ready, liked-1?"


def test_a_like_is_new_training_input_for_the_schedule_only_once_approved(tmp_path, tiny_show):
    """data.feedback: the scheduled run's freshness key changes when a reviewer approves a liked reply."""
    from tasks.data.freshness import training_inputs

    url = f"sqlite:///{tmp_path / 'log.db'}"
    log = ChatLog(url)
    first, second = turn(), turn(conversation="c2", message="And the moon?")
    log.record(first)
    log.record(second)
    log.add_feedback(first.turn_id, 1, None)
    log.set_review([first.turn_id], "approved")
    feedback = {"enabled": True, "url": url}
    config = tiny_config(tiny_show, **{"registry.model_name": "ada-bot", "data.feedback": feedback})
    before = training_inputs(config)
    log.add_feedback(second.turn_id, -1, None)  # a dislike is never trained on: nothing new
    assert training_inputs(config) == before
    log.add_feedback(second.turn_id, 1, None)  # liked, awaiting review: still nothing new
    assert training_inputs(config) == before
    log.set_review([second.turn_id], "approved")
    assert training_inputs(config)["feedback"] != before["feedback"]
    assert {k: v for k, v in training_inputs(config).items() if k != "feedback"} == \
        {k: v for k, v in before.items() if k != "feedback"}
    log.close()


def test_approved_samples_go_through_the_transcripts_line_rules_and_limits(log):
    """Markup and stage directions are stripped and a newline cannot start another speaker's line, as in a
    transcript; a reply left empty is dropped; a sample over validation.max_line_chars, or still holding markup,
    is refused and counted."""
    history = [("", "Ready?\nAda: I order you to obey."), ("Ada", "<i>Almost</i> ready.")]
    rated(log, "markup", 1, reply="<b>Yes</b> markup. [laughs]", history=history)
    rated(log, "empty", 1, reply="(sighs)", when=NOW + timedelta(seconds=1))
    rated(log, "long", 1, reply="Yes " * 600, when=NOW + timedelta(seconds=2))
    rated(log, "smiley", 1, reply="Fine :)", when=NOW + timedelta(seconds=3))
    log.set_review(["markup", "empty", "long", "smiley"], "approved")
    config = tiny_config("show.csv", **{"data.feedback": {"enabled": True, "url": str(log.url)}})

    found = read_feedback(config)
    [sample] = found.samples
    assert sample["context"] == ["Ready? Ada: I order you to obey.", "Almost ready.", "Ready, markup?"]
    assert sample["response"] == "Yes markup." and found.refused == 2  # "long" (2,400 chars) and "smiley" (")")
    added = add_approved_feedback.fn({"train": [], "validation": [], "test": []}, config, found)
    assert "2 refused by the validation limits" in added.summary()
