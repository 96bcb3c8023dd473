"""Where the conversation log is, how long it keeps turns, and how a URL may be shown (its password masked).

Environment:
    CASTBOT_CHATLOG=off                   no log at all (ChatLog.from_env returns None)
    CASTBOT_CHATLOG_URL                   SQLAlchemy URL; default sqlite:///$CASTBOT_HOME/chatlog.db. PostgreSQL:
                                          postgresql+psycopg://USER:PASSWORD@HOST:5432/DB (extra `castbot[postgres]`)
    CASTBOT_CHATLOG_RETENTION_DAYS        days a turn is kept (default 30; 0 or "forever": kept for ever); older
                                          turns are deleted by ChatLog.purge_expired() / start_purging(), when the
                                          log opens (from_env) and by `python -m castbot.chatlog purge`
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import sqlalchemy as sa

DEFAULT_RETENTION_DAYS = 30
_SECRET_QUERY = re.compile(r"(?i)pass|pwd|secret|token")
# user:password@ in a URL, and password=... in a libpq connection string or a query
_SECRETS_IN_TEXT = [(re.compile(r"(//[^/:@\s]*:)[^@\s]*@"), r"\1***@"),
                    (re.compile(r"(?i)\b(password|passwd|pwd)=[^\s&;]+"), r"\1=***")]


class ChatLogError(RuntimeError):
    """The log cannot be opened or used; the message names the URL without its password."""


def safe_url(url: str | sa.URL) -> str:
    """The URL as it may appear in a message: the password (and any password-like query value) masked."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return "<unparsable URL>"
    query = {k: "***" if _SECRET_QUERY.search(k) else v for k, v in parsed.query.items()}
    return parsed.set(query=query).render_as_string(hide_password=True)


def mask_passwords(text: str) -> str:
    """Free text (a driver's error) with any user:password@ or password=... masked."""
    for pattern, masked in _SECRETS_IN_TEXT:
        text = pattern.sub(masked, text)
    return text


def mask_settings(value):
    """Settings (JSON values: dicts, lists, strings, ...) with mask_passwords() applied to every string: what MLflow
    may show of a training run, and what its digest hashes (castbot/config/profile.py)."""
    if isinstance(value, dict):
        return {key: mask_settings(item) for key, item in value.items()}
    if isinstance(value, list):
        return [mask_settings(item) for item in value]
    return mask_passwords(value) if isinstance(value, str) else value


def default_url() -> str:
    """CASTBOT_CHATLOG_URL, else the SQLite file under the castbot state folder."""
    from castbot.common.settings import STATE_DIR

    return os.environ.get("CASTBOT_CHATLOG_URL") or f"sqlite:///{Path(STATE_DIR) / 'chatlog.db'}"


def retention_days() -> int | None:
    """CASTBOT_CHATLOG_RETENTION_DAYS in days (default 30), or None for 0 / "forever" (keep every turn)."""
    raw = os.environ.get("CASTBOT_CHATLOG_RETENTION_DAYS", "").strip()
    if not raw:
        return DEFAULT_RETENTION_DAYS
    if raw.lower() in ("0", "forever"):
        return None
    if not raw.isdigit():
        raise ChatLogError(f"CASTBOT_CHATLOG_RETENTION_DAYS={raw!r}: give a whole number of days, 0 or 'forever' "
                           f"to keep every turn, or unset it ({DEFAULT_RETENTION_DAYS} days)")
    return int(raw)
