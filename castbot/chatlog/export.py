"""Export the conversation log to parquet or JSONL, optionally redacted (python -m castbot.chatlog export --redact).

Redaction masks what names a person: e-mail addresses ([email]), phone numbers ([phone]), IPv4 and IPv6 addresses
([address]: the client of an open service is its address), and client names, which become client-1, client-2, ...
in the order they first appear (the same client keeps one pseudonym across the file, so per-client counts survive),
both in the client column and wherever a name of 3 or more characters occurs as a word in the text.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from castbot.chatlog.store import ChatLog

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
# what may be an IPv6 address (2001:db8::7, ::1, ::ffff:192.0.2.1, fe80::1%eth0); _ipv6 masks only real ones, so a
# time (10:30:45) or a MAC address (8 groups are needed without '::') is left alone
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9a-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9a-f]{1,4})?(?:%\w+)?"
                  r"(?![\w:]|\.\d)", re.IGNORECASE)
# a run of digits with the separators people write (+44 20 7946 0958, (555) 123-4567, 555.123.4567)
PHONE = re.compile(r"(?<![\w+])\+?\(?\d[\d ().\-/]{5,}\d(?!\w)")
TEXT_COLUMNS = ("message", "reply", "comment", "conversation_id")


def _ipv6(match: re.Match) -> str:
    try:
        ipaddress.IPv6Address(match.group())
    except ValueError:
        return match.group()
    return "[address]"


def _phone(match: re.Match) -> str:
    digits = sum(ch.isdigit() for ch in match.group())
    return "[phone]" if 7 <= digits <= 15 else match.group()  # E.164 numbers hold at most 15 digits


class Redactor:
    """Masks personal details in text; client names map to stable pseudonyms."""

    def __init__(self, clients: list[str]):
        names = [c for c in dict.fromkeys(clients) if c]
        self.pseudonyms = {name: f"client-{i}" for i, name in enumerate(names, start=1)}
        wordy = sorted((n for n in names if len(n) >= 3), key=len, reverse=True)  # longest first: 'ann' in 'anna'
        self.names = re.compile("|".join(rf"(?<!\w){re.escape(n)}(?!\w)" for n in wordy), re.IGNORECASE) \
            if wordy else None
        self.lookup = {n.casefold(): p for n, p in self.pseudonyms.items()}

    def client(self, name: str) -> str:
        return self.pseudonyms.get(name, name)

    def text(self, text):
        if not isinstance(text, str):
            return text  # None / NaN (no comment)
        text = EMAIL.sub("[email]", text)
        text = IPV6.sub(_ipv6, text)  # before IPv4: ::ffff:192.0.2.1 goes whole
        text = IPV4.sub("[address]", text)
        text = PHONE.sub(_phone, text)
        if self.names is not None:
            text = self.names.sub(lambda m: self.lookup[m.group().casefold()], text)
        return text


def redact_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """turns() rows with e-mail addresses, phone numbers, IP addresses and client names masked (a copy)."""
    redactor = Redactor(frame["client"].tolist())
    redacted = frame.copy()
    for column in TEXT_COLUMNS:
        redacted[column] = [redactor.text(value) for value in frame[column]]
    redacted["client"] = [redactor.client(name) for name in frame["client"]]
    redacted["history"] = [[[redactor.text(speaker), redactor.text(text)] for speaker, text in history]
                           for history in frame["history"]]
    return redacted


def export_turns(log: ChatLog, since: datetime, model: str | None, out: Path, redact: bool = False) -> int:
    """Write the turns (with rating, comment and review) since a time to parquet or JSONL; the number written."""
    frame = log.turns(model_name=model, since=since)
    if redact:
        frame = redact_frame(frame)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        frame.to_parquet(out, index=False)
    else:
        frame.to_json(out, orient="records", lines=True, date_format="iso", force_ascii=False)
    return len(frame)
