"""Clean a canonical transcript rule by rule; every rule reports the rows and characters it touched.

Rows are never reordered (episode order and scenes are kept); rules only rewrite text or drop rows.
"Characters" counts what a rule removed or replaced: the length lost, or the positions that differ
when the length stays the same; for a dropped row, the length of its line.
"""

import html
from pathlib import Path

import pandas as pd
from prefect import task

from castbot.config.data import CleaningConfig
from castbot.common.cache import announce_cache_hit, content_policy
from tasks.data.lineage import publish_markdown
from castbot.common.text import markdown_cell, shorten

HTML_TAG = r"</?[A-Za-z][^<>]{0,300}>"
BBCODE = r"(?i)\[/?(?:b|i|u|s|url|quote|color|size|img|code|spoiler)(?:=[^\]]*)?\]"
DIRECTION = r"\[[^\[\]]*\]|\([^()]*\)|(?<!\w)\*[^*\n]{1,200}\*(?!\w)"  # [..], (..), forum-style *action*
# a direction cut in two by the scrape: 'throws the bottle) Let's go' / 'Let's go. (presses a button.'
DIRECTION_FRAGMENT = r"^\s*[a-z][^()\[\]]{0,120}[)\]]|[(\[][^()\[\]]*$"
LEFTOVER_MARKUP = r"[\[\]()<>*]|&[a-z]+;"  # what the cleaned-dialogue suite bounds


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


def fix_mojibake(lines: pd.Series) -> pd.Series:
    """ftfy on non-ASCII lines only (ASCII text cannot hold mojibake); quotes and widths left alone."""
    import ftfy

    config = ftfy.TextFixerConfig(unescape_html=False, uncurl_quotes=False, fix_latin_ligatures=False,
                                  fix_character_width=False, fix_line_breaks=False, explain=False)
    fixed = [s if s.isascii() else ftfy.fix_text(s, config) for s in lines.tolist()]
    return pd.Series(fixed, index=lines.index, dtype=object)


def only_where(lines: pd.Series, candidates: str, fix) -> pd.Series:
    """fix() applied to the lines holding one of `candidates` (a cheap vectorised pre-filter)."""
    mask = lines.str.contains(candidates, regex=True)
    out = lines.astype(object)
    if mask.any():
        out[mask] = fix(lines[mask]).astype(object)
    return out


def strip_markup(lines: pd.Series) -> pd.Series:
    """HTML tags and entities, BBCode tags."""
    def fix(part: pd.Series) -> pd.Series:
        part = part.str.replace(HTML_TAG, " ", regex=True).str.replace(BBCODE, " ", regex=True)
        return pd.Series([html.unescape(s) if "&" in s else s for s in part.tolist()], index=part.index, dtype=object)

    return only_where(lines, r"[<\[&]", fix)


def strip_directions(lines: pd.Series) -> pd.Series:
    """Inline [..], (..) and *..* directions (twice, for one level of nesting), then cut-off fragments."""
    def fix(part: pd.Series) -> pd.Series:
        for pattern in (DIRECTION, DIRECTION, DIRECTION_FRAGMENT):
            part = part.str.replace(pattern, " ", regex=True)
        return part

    return only_where(lines, r"[\[\]()*]", fix)


def normalize_whitespace(lines: pd.Series) -> pd.Series:
    """NBSP, tabs, newlines and runs of spaces to one space; trimmed."""
    return lines.str.replace(r"\s+", " ", regex=True).str.strip()


def strip_label_colon(lines: pd.Series) -> pd.Series:
    """The colon a scrape left at the start of a line when it split 'Rick: Every 10th.' into label and text
    (': Every 10th.'); a colon not followed by a space (':)') stays."""
    return lines.str.replace(r"^\s*:\s+", "", regex=True)


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


@task(name="clean_transcript", cache_policy=content_policy(__file__), on_completion=[announce_cache_hit])
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
