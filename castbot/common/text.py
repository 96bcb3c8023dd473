"""Text for messages and reports, cut to a readable length: one definition for errors, logs and tables."""


def shorten(text: str, width: int, keep: str = "start", mark: str = "...") -> str:
    """text when it fits in width characters, else its start (or, keep="end", its end) and mark."""
    if len(text) <= width:
        return text
    return mark + text[-width:] if keep == "end" else text[:width] + mark


def markdown_cell(text: str, limit: int | None = None, keep: str = "start") -> str:
    """Text as one markdown table cell: line breaks as ' / ', at most limit characters (cut with shorten), pipes
    escaped, and '<' as &lt; so that leaked tokens such as </s> show instead of being read as HTML."""
    text = " / ".join(part.strip() for part in text.strip().splitlines())
    if limit is not None and len(text) > limit:
        text = shorten(text, limit - 1, keep, mark="…")
    return text.replace("|", "\\|").replace("<", "&lt;")
