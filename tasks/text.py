"""Text for messages and reports, cut to a readable length: one definition for errors, logs and tables."""


def shorten(text: str, width: int, keep: str = "start", mark: str = "...") -> str:
    """text when it fits in width characters, else its start (or, keep="end", its end) and mark."""
    if len(text) <= width:
        return text
    return mark + text[-width:] if keep == "end" else text[:width] + mark
