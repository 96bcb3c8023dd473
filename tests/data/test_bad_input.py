"""Bad input: every case stops before training with a message naming the file, the column or rows, and the fix."""

import json
from pathlib import Path

import pandas as pd
import pytest

from castbot.common.errors import DataError
from tests.conftest import run_data_steps, tiny_config, tiny_show_rows, write_tiny_show

pytestmark = pytest.mark.flow


def rows(**kwargs) -> pd.DataFrame:
    return pd.DataFrame(tiny_show_rows(**kwargs))


def write(name: str, content: bytes):
    def writer(folder: Path) -> Path:
        (folder / name).write_bytes(content)
        return folder / name
    return writer


def csv_with(frame: pd.DataFrame, name: str = "show.csv", **to_csv):
    def writer(folder: Path) -> Path:
        frame.to_csv(folder / name, index=False, **to_csv)
        return folder / name
    return writer


def cp1252_show(folder: Path) -> Path:
    frame = rows()
    frame.loc[1, "line"] = "Café déjà vu – naïve"
    (folder / "show.csv").write_bytes(frame.to_csv(index=False).encode("cp1252"))
    return folder / "show.csv"


def ten_mb_row(folder: Path) -> Path:
    frame = rows()
    frame.loc[5, "line"] = "la " * 3_400_000  # one 10 MB value in an otherwise fine file
    return csv_with(frame)(folder)


def broken_jsonl(folder: Path) -> Path:
    lines = [json.dumps(r) for r in tiny_show_rows()]
    lines[2] = lines[2][:-5]  # cut off mid-object
    (folder / "show.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "show.jsonl"


def numeric_parquet(folder: Path) -> Path:
    frame = rows()
    frame["line"] = range(len(frame))
    frame.to_parquet(folder / "show.parquet")
    return folder / "show.parquet"


def duplicate_columns(folder: Path) -> Path:
    header, body = rows().to_csv(index=False).split("\n", 1)
    (folder / "show.csv").write_text(header + ",line\n" + body.replace("\n", ",x\n"), encoding="utf-8")
    return folder / "show.csv"


CASES = {
    # name: (writer, config overrides, substrings the message must hold)
    "missing file": (lambda folder: folder / "nope.csv", {}, ["nope.csv", "not found", "data.path"]),
    "empty file": (write("show.csv", b""), {}, ["show.csv", "empty"]),
    "header only": (write("show.csv", b"episode,scene,speaker,line\n"), {}, ["show.csv", "no data rows", "header"]),
    "wrong delimiter": (csv_with(rows(), sep=";"), {}, ["show.csv", "';'", "data.delimiter"]),
    "mapped column missing": (csv_with(rows().rename(columns={"speaker": "who"})), {},
                              ["show.csv", "speaker -> 'speaker'", "'who'", "data.columns"]),
    "duplicate column names": (duplicate_columns, {}, ["show.csv", "['line']", "more than once", "rename"]),
    "cp1252 file": (cp1252_show, {}, ["show.csv", "not UTF-8", "line 3", "data.encoding: cp1252", "iconv"]),
    "binary garbage": (write("show.csv", bytes(range(256)) * 64), {}, ["show.csv", "binary", "UTF-8 CSV"]),
    "single 10 MB line": (write("show.csv", b"episode,speaker,line " * 500_000), {},
                          ["show.csv", "10,500,000 characters", "header row"]),
    "a 10 MB value": (ten_mb_row, {}, ["show.csv", "raw_transcript", "[line]", "row 5", "10,200,000 chars",
                                       "validation"]),
    "character absent": (csv_with(rows()), {"character": "Zed"},
                         ["show.csv", "'Zed' speaks 0 line(s)", "Ada (72)", "min_character_lines"]),
    "character with too few lines": (csv_with(rows()), {"validation.min_character_lines": 500},
                                     ["show.csv", "speaker == \"Ada\"", "observed 72", "'Ada' speaks 72"]),
    "single episode": (csv_with(rows(episodes=1, lines_per_episode=80)), {},
                       ["show.csv", "expect_column_unique_value_count_to_be_between", "observed 1",
                        "min_character_episodes"]),
    "jsonl with one broken line": (broken_jsonl, {}, ["show.jsonl", "line 3 is not valid JSON", "fix or delete"]),
    "parquet with numeric line": (numeric_parquet, {}, ["show.parquet", "'line'", "int64", "not text",
                                                        "data.columns.line"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_with_a_clear_message(case, tmp_path):
    writer, overrides, expected = CASES[case]
    config = tiny_config(writer(tmp_path), **overrides)
    with pytest.raises(DataError) as refused:
        run_data_steps(config, tmp_path / "docs")
    message = str(refused.value)
    for text in expected:
        assert text in message, f"{case}: {text!r} not in message:\n{message}"
    assert len(message) < 2000, f"{case}: message too long to read ({len(message)} chars)"


def test_cp1252_is_decoded_when_the_profile_names_it(tmp_path):
    config = tiny_config(cp1252_show(tmp_path), **{"data.encoding": "cp1252"})
    splits = run_data_steps(config, tmp_path / "docs")
    assert "Café déjà vu – naïve" in {line for s in splits["train"] + splits["test"] + splits["validation"]
                                      for line in s["context"]}


def test_failed_validation_builds_data_docs_naming_the_failure(tmp_path):
    config = tiny_config(csv_with(rows())(tmp_path), character="Zed")
    with pytest.raises(DataError) as refused:
        run_data_steps(config, tmp_path / "docs")
    index = tmp_path / "docs" / "dialogue" / "index.html"
    assert str(index) in str(refused.value)
    assert index.is_file()
    [page] = (tmp_path / "docs" / "dialogue" / "validations").rglob("*.html")
    html = page.read_text(encoding="utf-8")
    assert "Unsuccessful Expectations" in html and "Zed" in html
    assert "Must have greater than or equal to" in html  # the character's row count, rendered


def bad_profile(folder: Path) -> Path:
    """A profile whose transcript lacks the character: refused in validation, after ingest and cleaning."""
    data = write_tiny_show(folder / "show.csv")
    profile = folder / "bad.yaml"
    config = tiny_config(data, character="Zed").model_dump(mode="json")
    config["data"]["path"] = data.name  # relative to the profile's folder
    profile.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return profile


def test_bad_input_through_the_flow_and_cli_registers_nothing(prefect_harness, tmp_path, capsys):
    from mlflow import MlflowClient

    from castbot.common.settings import STATE_DIR
    from castbot.config.profile import load_profile
    from flows.train import main, train

    reports = STATE_DIR / "reports"
    before = {p: p.stat().st_mtime_ns for p in reports.rglob("*") if p.is_file()} if reports.is_dir() else {}
    folders_before = set(reports.iterdir()) if reports.is_dir() else set()
    profile = bad_profile(tmp_path)

    with pytest.raises(DataError, match="'Zed' speaks 0 line"):
        train(load_profile(profile))
    assert main([str(profile)]) == 1
    err = capsys.readouterr().err
    assert "castbot:" in err and "show.csv" in err and "'Zed' speaks 0 line" in err

    assert not [m for m in MlflowClient().search_registered_models() if m.name == "zed-bot"]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # earlier reports untouched
    new = set(reports.iterdir()) - folders_before
    assert len(new) == 2  # one fresh report folder per run
    for folder in new:
        assert (folder / "cleaning_report.md").is_file() and (folder / "dialogue" / "index.html").is_file()
