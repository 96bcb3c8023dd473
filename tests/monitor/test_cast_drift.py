"""A cast model's monitor (castbot/scores/drift.py cast_window_checks) on the real Rick and Morty transcript: each
member's logged turns are judged against that member's own reference, so another show's lines sent to Morty flag
Morty alone, a member with a handful of turns is reported as such, and the names carry the member."""

import random

import pandas as pd
import pytest

from castbot.config.monitor import MonitorConfig
from castbot.scores.drift import cast_window_checks, window_checks
from tasks.monitor.steps import alarms, cast_turns, figures_of, report_markdown
from tasks.release.trained_on import build_reference, user_side
from tests.monitor.test_drift import splits_of, turns_frame

pytestmark = pytest.mark.unit
CAST = ["Rick", "Morty", "Summer"]


@pytest.fixture(scope="module")
def cast(shared_data):
    """The Rick, Morty and Summer reference as the training flow stores it, each member's held-out user side, the
    splits, and 100 lines of The Lord of the Rings."""
    from tasks.data.dialogues import build_dialogues

    config, cleaned, _ = splits_of("rick-and-morty.yaml")
    splits = build_dialogues.fn(cleaned, CAST, config.dialogue, config.training.seed)
    reference = build_reference(splits, CAST[0], 2000, seed=0, cast=CAST)
    held_out = {name: [text for split in ("validation", "test") for text, _ in
                       user_side([s for s in splits[split] if s["character"] == name], name)] for name in CAST}
    _, lotr, _ = splits_of("lotr.yaml")
    return reference, held_out, splits, random.Random(0).sample(lotr["line"].astype(str).tolist(), 100)


def window(messages: dict[str, list[str]]):
    """Logged turns of each member (the chat log's `character`), in the columns the checks read."""
    return pd.concat([turns_frame(lines, character=name) for name, lines in messages.items()], ignore_index=True)


@pytest.fixture(scope="module")
def judged(cast):
    """Rick's held-out turns, 100 lines of another show sent to Morty, 10 of Summer's: the window and its checks."""
    reference, held_out, _, lotr = cast
    turns = window({"Rick": held_out["Rick"], "Morty": lotr, "Summer": held_out["Summer"][:10]})
    return turns, cast_window_checks(reference, turns, MonitorConfig(min_turns=50))


def test_the_stored_reference_holds_each_members_own_lines(cast):
    reference, _, splits, _ = cast
    assert list(reference["cast"]) == CAST
    assert reference["character"] == "Rick"  # the whole-cast reference is kept as it was
    for name, own in reference["cast"].items():
        said = {s["response"] for s in splits["train"] if s["character"] == name}
        heard = {s["context"][-1] for s in splits["train"] if s["character"] == name and s["context"]}
        assert own["character"] == name and own["character_lines"] and set(own["character_lines"]) <= said
        assert own["contexts"] and set(own["contexts"]) <= heard
    assert len(reference["cast"]["Summer"]["character_lines"]) < len(reference["cast"]["Morty"]["character_lines"])


def test_another_show_sent_to_one_member_flags_that_member_alone(cast, judged):
    _, held_out, _, _ = cast
    _, checks = judged
    mine = {name: {c.name: c for c in checks if c.character == name} for name in CAST}

    assert mine["Morty"]["drift"].verdict == "yes" and mine["Morty"]["drift"].alarm
    assert mine["Morty"]["drift"].line().startswith("Morty: drift: yes (AUC ")
    assert mine["Rick"]["drift"].verdict == "no", mine["Rick"]["drift"].line()
    assert f"{len(held_out['Rick'])} turns" in mine["Rick"]["drift"].line()  # Rick's turns alone, not the window's
    # Summer's 10 turns: reported, not judged, no event
    assert [c.line() for c in mine["Summer"].values()] == ["Summer: window: not enough data (10 turns < "
                                                          "monitor.min_turns=50)"]
    assert [(c.character, c.name) for c in alarms(checks)["drifted"]] == [("Morty", "drift")]

    figures = figures_of(checks)
    assert figures["drift_auc_morty"] > figures["drift_threshold_morty"]
    assert figures["drift_auc_rick"] <= figures["drift_threshold_rick"]
    assert figures["turns_summer"] == 10 and "drift_auc" not in figures and "drift_auc_summer" not in figures


def test_the_same_turns_judged_together_against_the_first_member_hide_the_drift(cast):
    """Why per member: Morty's off-show turns diluted among Rick's and judged against Rick's reference."""
    reference, held_out, _, lotr = cast
    mixed = window({"Rick": held_out["Rick"] * 3, "Morty": lotr[:25]})
    [drift, *_] = window_checks(reference["cast"]["Rick"], mixed, MonitorConfig(min_turns=50, permutations=3))
    per_member = cast_window_checks(reference, mixed, MonitorConfig(min_turns=20, permutations=3))
    assert drift.verdict == "no", drift.line()
    assert [c.character for c in alarms(per_member)["drifted"]] == ["Morty"]


def test_the_artifact_lists_each_member_with_its_turns_and_alarms(cast, judged):
    reference, held_out, _, _ = cast
    turns, checks = judged
    counts = cast_turns(turns, reference)
    assert counts == {"Rick": len(held_out["Rick"]), "Morty": 100, "Summer": 10}
    markdown = report_markdown("cast-bot", "3", checks, 0, 24, counts)
    assert f"- **Rick**: {len(held_out['Rick'])} turns, no alarm" in markdown
    assert "- **Morty**: 100 turns, **drift" in markdown and "- **Summer**: 10 turns, no alarm" in markdown
    assert markdown.index("#### Rick") < markdown.index("#### Morty") < markdown.index("#### Summer")
    assert "| window | not enough data | 10 turns < monitor.min_turns=50 |" in markdown


def test_turns_as_someone_outside_the_cast_and_an_old_reference_are_reported_not_judged(cast):
    reference, held_out, _, _ = cast
    turns = window({"Rick": held_out["Rick"], "Jerry": held_out["Rick"][:7]})
    quick = MonitorConfig(min_turns=50, permutations=2)
    checks = cast_window_checks(reference, turns, quick)
    stranger = [c for c in checks if c.character == "Jerry"]
    assert [c.line() for c in stranger] == ["Jerry: reference: not judged (7 turns as Jerry, who is not in the "
                                            "champion's cast (Rick, Morty, Summer))"]
    assert cast_turns(turns, reference) == {"Rick": len(held_out["Rick"]), "Morty": 0, "Summer": 0, "Jerry": 7}
    assert not any(c.alarm for c in checks if c.character != "Rick")

    # a champion registered before members had references of their own: the whole window, saying so
    old = {key: value for key, value in reference.items() if key != "cast"}
    note, drift, *_ = cast_window_checks(old, turns, quick)
    assert note.line().startswith("cast: not judged per member (the champion's reference holds one character's, "
                                  "Rick:") and not note.alarm
    assert drift.name == "drift" and not drift.character and f"{len(turns)} turns" in drift.line()
    assert cast_turns(turns, old) == {}
