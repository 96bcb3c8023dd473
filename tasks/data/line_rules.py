"""The line rules of the cleaning step: what a transcript line (and a liked turn's text, tasks/data/feedback.py)
goes through before it becomes a training sample. Vectorised over a pandas Series of lines; clean_transcript
(tasks/data/clean.py) applies them one by one to report each, clean_lines all at once."""

import html

import pandas as pd

from castbot.config.data import CleaningConfig

HTML_TAG = r"</?[A-Za-z][^<>]{0,300}>"
BBCODE = r"(?i)\[/?(?:b|i|u|s|url|quote|color|size|img|code|spoiler)(?:=[^\]]*)?\]"
DIRECTION = r"\[[^\[\]]*\]|\([^()]*\)|(?<!\w)\*[^*\n]{1,200}\*(?!\w)"  # [..], (..), forum-style *action*
# a direction cut in two by the scrape: 'throws the bottle) Let's go' / 'Let's go. (presses a button.'
DIRECTION_FRAGMENT = r"^\s*[a-z][^()\[\]]{0,120}[)\]]|[(\[][^()\[\]]*$"
LEFTOVER_MARKUP = r"[\[\]()<>*]|&[a-z]+;"  # what the cleaned-dialogue suite bounds


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


def clean_lines(lines: list[str], rules: CleaningConfig) -> list[str]:
    """The line rules clean_transcript applies, in its order, to free-standing lines; "" for a line that was all
    markup or directions (the transcript drops such a row)."""
    if not lines:
        return []
    series = pd.Series(lines, dtype=object)
    if rules.strip_markup:
        series = strip_markup(series)
    if rules.fix_mojibake:
        series = fix_mojibake(series)
    if rules.strip_stage_directions:
        series = strip_directions(series)
    if rules.normalize_whitespace:
        series = normalize_whitespace(series)
    return strip_label_colon(series).str.strip().tolist()
