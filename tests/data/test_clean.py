"""Cleaning rules: each one changes what it should, reports rows and characters, and keeps row order."""

import pandas as pd
import pytest

from castbot.config.data import CleaningConfig
from tasks.data.clean import clean_transcript, report_markdown

pytestmark = pytest.mark.unit


def frame(rows: list[tuple]) -> pd.DataFrame:
    """rows of (episode, scene, speaker, line)."""
    return pd.DataFrame(rows, columns=["episode", "scene", "speaker", "line"])


def rule(report: dict, prefix: str) -> dict:
    return next(r for r in report["rules"] if r["rule"].startswith(prefix))


def clean(rows, **settings):
    return clean_transcript.fn(frame(rows), CleaningConfig(**settings))


def test_stage_directions_and_direction_rows_are_removed():
    cleaned, report = clean([
        ("1", "1", "Monica", "There's nothing to tell! (She sits down.) He's just some guy."),
        ("1", "1", "Scene Directions", "(They all stare, bemused.)"),
        ("1", "1", "Joey", "[Time Lapse]"),
        ("1", "1", "Ross", "Hi. *waves*"),
    ])
    assert cleaned["line"].tolist() == ["There's nothing to tell! He's just some guy.", "Hi."]
    assert rule(report, "direction rows")["rows"] == 1
    assert rule(report, "direction-only rows")["rows"] == 1  # Joey's line was nothing but a direction
    assert rule(report, "inline stage directions")["rows"] == 3
    assert rule(report, "inline stage directions")["chars"] == len("(She sits down.)") + len("[Time Lapse]") + len(
        "*waves*") - 3  # each replaced by one space


def test_markup_mojibake_and_whitespace():
    cleaned, report = clean([
        ("1", "", "Rick", "<i>Wubba</i> lubba &amp; [b]dub[/b]"),
        ("1", "", "Rick", "donâ€™t panic"),
        ("1", "", "Rick", "  two\u00a0\u00a0spaces\n                    and a newline  "),
        ("1", "", "Rick", "M*A*S*H stays"),
    ])
    assert cleaned["line"].tolist() == ["Wubba lubba & dub", "don’t panic", "two spaces and a newline",
                                        "M*A*S*H stays"]
    assert rule(report, "HTML/forum markup")["rows"] == 1
    assert rule(report, "mojibake (ftfy)")["rows"] == 1
    assert rule(report, "NBSP")["rows"] >= 2
    assert "<i>" in rule(report, "HTML/forum markup")["example"]


def test_a_colon_left_by_a_split_speaker_label_goes():
    cleaned, report = clean([("1", "", "Rick", ": Every 10th.\n"), ("1", "", "Morty", "  :  Deal."),
                             ("1", "", "Summer", ":) fine"), ("1", "", "Beth", "Ratio 3: 1")])
    assert cleaned["line"].tolist() == ["Every 10th.", "Deal.", ":) fine", "Ratio 3: 1"]
    assert rule(report, "colon left of a split speaker label")["rows"] == 2


def test_speaker_labels_case_colon_and_aliases():
    cleaned, report = clean([
        ("1", "", "Rick:", "a"), ("1", "", " rick ", "b"), ("1", "", "Rick", "c"), ("1", "", "Rick", "d"),
        ("1", "", "Pickle Rick", "e"), ("1", "", "rick sanchez", "f"), ("1", "", "Morty", "g"),
    ], aliases={"Rick": ["Pickle Rick", "Rick Sanchez"]})
    assert cleaned["speaker"].tolist() == ["Rick"] * 6 + ["Morty"]
    assert rule(report, "speaker label trim")["rows"] == 2
    assert rule(report, "speaker aliases")["rows"] == 2


def test_title_case_for_upper_case_scripts():
    cleaned, _ = clean([("m", "", "FRODO", "a"), ("m", "", "SAM ", "b")], speaker_case="title")
    assert cleaned["speaker"].tolist() == ["Frodo", "Sam"]


@pytest.mark.parametrize("policy, expected", [("drop", ["Rick", "Morty"]),
                                              ("keep", ["Rick", "Rick and Morty", "#ALL#", "Morty"])])
def test_multi_speaker_labels(policy, expected):
    cleaned, report = clean([("1", "", "Rick", "a"), ("1", "", "Rick and Morty", "b"), ("1", "", "#ALL#", "c"),
                             ("1", "", "Morty", "d")], multi_speaker=policy)
    assert cleaned["speaker"].tolist() == expected
    assert rule(report, "multi-speaker")["rows"] == 2


def test_empty_lines_and_duplicates_keep_order_and_scenes():
    rows = [("2", "1", "Ada", "hello"), ("2", "1", "Ada", "hello"), ("2", "2", "Ada", "hello"),
            ("2", "2", None, "who?"), ("1", "1", "Bram", "   "), ("1", "1", "Bram", "bye"), ("1", "1", "Ada", "hello")]
    cleaned, report = clean(rows)
    # the consecutive repeat goes; the same words in another scene or episode stay; file order is kept
    assert cleaned[["episode", "scene", "line"]].values.tolist() == [
        ["2", "1", "hello"], ["2", "2", "hello"], ["1", "1", "bye"], ["1", "1", "hello"]]
    assert rule(report, "empty line or speaker")["rows"] == 2
    assert rule(report, "exact duplicate rows")["rows"] == 1
    rows.append(("1", "1", "Bram", "bye"))  # repeats a row two lines up in the same scene
    assert len(clean(rows)[0]) == 5
    assert len(clean(rows, duplicates="all")[0]) == 4


def test_report_markdown_lists_every_rule_with_counts():
    _, report = clean([("1", "", "Scene Directions", "(door opens)"), ("1", "", "Ada", "Hi | there")])
    text = report_markdown(report, "show.csv")
    assert "2 rows in, 1 rows out" in text
    assert "| direction rows (direction_speakers) | 1 | 12 |" in text
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == len(report["rules"]) + 1


def test_friends_direction_rows_cleaned(shared_data):
    from castbot.config.profile import load_profile
    from tasks.data.ingest import load_transcript

    config = load_profile("configs/friends.yaml")
    cleaned, report = clean_transcript.fn(load_transcript.fn(config.data), config.cleaning)
    assert rule(report, "direction rows")["rows"] == 6060  # SOURCE.md: Scene Directions 6,060
    assert not cleaned["speaker"].isin(["Scene Directions", "#ALL#"]).any()
    assert cleaned["episode"].nunique() == 236  # season + episode, e.g. S1E1
    assert report["leftover_markup_rows"] / len(cleaned) < config.validation.max_markup_share
