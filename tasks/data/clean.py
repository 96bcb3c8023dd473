"""Clean a canonical transcript rule by rule; every rule reports the rows and characters it touched.

Rows are never reordered (episode order and scenes are kept); rules only rewrite text or drop rows.
"Characters" counts what a rule removed or replaced: the length lost, or the positions that differ
when the length stays the same; for a dropped row, the length of its line.
"""

from pathlib import Path

import pandas as pd
from prefect import task

from castbot.common.cache import announce_cache_hit, content_policy
from castbot.common.text import markdown_cell, shorten
from castbot.config.data import CleaningConfig
from tasks.data import line_rules
from tasks.data.line_rules import (
    LEFTOVER_MARKUP,
    fix_mojibake,
    normalize_whitespace,
    strip_directions,
    strip_label_colon,
    strip_markup,
)
from tasks.data.lineage import publish_markdown


def _changed_chars(before: pd.Series, after: pd.Series) -> int:
    total = 0
    for b, a in zip(before, after):
        total += sum(x != y for x, y in zip(b, a)) if len(b) == len(a) else abs(len(b) - len(a))
    return total


def _example(before: str, after: str) -> str:
    return f"{shorten(before, 70)!r} -> {shorten(after, 70)!r}"


class Cleaner:
    """Applies rules to a frame in order and keeps the per-rule counts."""

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame.copy()
        self.rules: list[dict] = []

    def rewrite(self, rule: str, column: str, fix) -> None:
        """Replace `column` with fix(column) (vectorised); count the rows and characters that changed."""
        before = self.frame[column].fillna("").astype(str)
        after = fix(before)
        changed = before.ne(after)
        self.frame[column] = after.where(self.frame[column].notna(), self.frame[column])
        self.record(rule, int(changed.sum()), _changed_chars(before[changed], after[changed]),
                     next((_example(b, a) for b, a in zip(before[changed], after[changed])), ""))

    def drop(self, rule: str, mask: pd.Series) -> None:
        """Drop rows where mask is True; their line lengths count as characters touched."""
        dropped = self.frame[mask]
        lines = dropped["line"].fillna("").astype(str)
        example = f"{dropped['speaker'].iloc[0]!s}: {lines.iloc[0][:70]!r}" if len(dropped) else ""
        self.record(rule, len(dropped), int(lines.str.len().sum()), example)
        self.frame = self.frame[~mask]

    def record(self, rule: str, rows: int, chars: int, example: str) -> None:
        self.rules.append({"rule": rule, "rows": rows, "chars": chars, "example": example})


def trim_labels(speakers: pd.Series) -> pd.Series:
    """Outer spaces, inner runs of spaces and trailing colons ('Rick:' -> 'Rick')."""
    return speakers.str.replace(r"\s+", " ", regex=True).str.strip().str.rstrip(":").str.strip()


def normalize_case(speakers: pd.Series, mode: str) -> pd.Series:
    """keep / majority (case variants take their most frequent spelling) / title / upper."""
    if mode == "title":
        return speakers.str.title()
    if mode == "upper":
        return speakers.str.upper()
    if mode == "majority":
        nonempty = speakers[speakers.ne("")]
        counts = nonempty.value_counts()  # most frequent first, so the first spelling per key wins
        spelling = pd.Series(counts.index, index=counts.index.str.casefold()).groupby(level=0).first()
        return speakers.str.casefold().map(spelling).fillna(speakers)
    return speakers


def apply_aliases(speakers: pd.Series, aliases: dict[str, list[str]]) -> pd.Series:
    """Labels listed under a canonical name become that name (compared ignoring case)."""
    lookup = {alias.strip().rstrip(":").casefold(): name for name, names in aliases.items() for alias in [name, *names]}
    return speakers.map(lambda s: lookup.get(s.casefold(), s))


# the key covers line_rules.py too: a changed rule must not reuse an earlier cleaned transcript
@task(name="clean_transcript", cache_policy=content_policy(__file__, line_rules.__file__),
      on_completion=[announce_cache_hit])
def clean_transcript(frame: pd.DataFrame, rules: CleaningConfig) -> tuple[pd.DataFrame, dict]:
    """Apply the cleaning rules in order; return the cleaned frame and a per-rule report."""
    cleaner = Cleaner(frame)
    if rules.strip_markup:
        cleaner.rewrite("HTML/forum markup", "line", strip_markup)
    if rules.fix_mojibake:
        cleaner.rewrite("mojibake (ftfy)", "line", fix_mojibake)
        cleaner.rewrite("mojibake in speaker labels (ftfy)", "speaker", fix_mojibake)
    cleaner.rewrite("speaker label trim / trailing colon", "speaker", trim_labels)
    cleaner.rewrite(f"speaker label case ({rules.speaker_case})", "speaker",
                    lambda s: normalize_case(s, rules.speaker_case))
    cleaner.rewrite("speaker aliases", "speaker", lambda s: apply_aliases(s, rules.aliases))
    speakers = cleaner.frame["speaker"].fillna("").astype(str)
    directions = {name.casefold() for name in rules.direction_speakers}
    cleaner.drop("direction rows (direction_speakers)", speakers.str.casefold().isin(directions))
    said = cleaner.frame["line"].fillna("").astype(str).str.strip().ne("")
    if rules.strip_stage_directions:
        cleaner.rewrite("inline stage directions [..] (..) *..* and cut-off fragments", "line", strip_directions)
    if rules.normalize_whitespace:
        cleaner.rewrite("NBSP, repeated spaces, embedded newlines", "line", normalize_whitespace)
    cleaner.rewrite("colon left of a split speaker label (': Every 10th.')", "line", strip_label_colon)
    line = cleaner.frame["line"].fillna("").astype(str).str.strip()
    cleaner.drop("direction-only rows (text was all directions)", said & line.eq(""))
    multi = cleaner.frame["speaker"].fillna("").astype(str).str.contains(rules.multi_speaker_pattern, regex=True)
    if rules.multi_speaker == "drop":
        cleaner.drop("multi-speaker rows (dropped)", multi)
    else:
        cleaner.record("multi-speaker rows (kept)", int(multi.sum()), 0, "")
    kept = cleaner.frame
    empty = kept["line"].fillna("").astype(str).str.strip().eq("") | kept["speaker"].fillna("").astype(str).eq("")
    cleaner.drop("empty line or speaker", empty)
    if rules.duplicates != "keep":
        key = cleaner.frame[["episode", "scene", "speaker", "line"]]
        repeat = key.eq(key.shift()).all(axis=1) if rules.duplicates == "consecutive" else key.duplicated()
        cleaner.drop(f"exact duplicate rows ({rules.duplicates})", repeat)
    cleaned = cleaner.frame.reset_index(drop=True)
    cleaned[["speaker", "line"]] = cleaned[["speaker", "line"]].astype(str)
    report = {"rows_in": len(frame), "rows_out": len(cleaned), "rules": cleaner.rules,
              "leftover_markup_rows": int(cleaned["line"].str.contains(LEFTOVER_MARKUP, regex=True).sum())}
    return cleaned, report


def report_markdown(report: dict, source: str) -> str:
    """The cleaning report as a markdown table, one row per rule."""
    rows = "\n".join(f"| {r['rule']} | {r['rows']:,} | {r['chars']:,} | {markdown_cell(r['example'])} |"
                     for r in report["rules"])
    return (f"# Cleaning report\n\n`{source}`: {report['rows_in']:,} rows in, {report['rows_out']:,} rows out; "
            f"{report['leftover_markup_rows']:,} cleaned lines still hold brackets or markup.\n\n"
            f"| rule | rows touched | characters | example |\n|---|---:|---:|---|\n{rows}\n")


@task(name="publish_cleaning_report")
def publish_cleaning_report(report: dict, source: str, folder: str) -> str:
    """Write the report (markdown + JSON) into the run's report folder and as a Prefect artifact."""
    import json

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    markdown = report_markdown(report, source)
    (out / "cleaning_report.md").write_text(markdown, encoding="utf-8")
    (out / "cleaning_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    publish_markdown(markdown, key="cleaning-report", description=f"What cleaning changed in {source}")
    return str(out / "cleaning_report.md")
