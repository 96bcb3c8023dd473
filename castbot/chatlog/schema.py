"""The conversation log's rows (TurnRecord), its tables, and the migrations that bring an older log up to date.

MIGRATIONS[i] takes a log at version i to version i + 1. A step describes the tables as they were at its version
(never today's definitions), so a new log and an old one end in the same schema; append steps, never edit one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa

if TYPE_CHECKING:
    import pandas as pd

# a reply cut short by the client or an error is not the reply the user rated: never train on it
COMPLETE = ("stop", "length")
REVIEW_STATES = ("pending", "approved", "rejected")  # a rating's review: liked turns train only once approved


@dataclass
class TurnRecord:
    """One answered turn, written by the service."""

    turn_id: str  # uuid4 hex, returned to the client
    conversation_id: str  # given by the client or a new uuid4 hex
    time: datetime  # UTC, when the request arrived
    endpoint: str  # "chat" | "chat/stream" | "generate" | "v1/chat/completions"
    message: str  # the user's last message
    reply: str
    history_turns: int
    model_name: str
    model_version: str
    character: str
    engine: str
    prompt_tokens: int
    new_tokens: int
    latency_s: float  # request start -> reply complete
    ttft_s: float | None  # time to first piece (streams), else None
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    client: str = ""  # who asked: the API key's name, or the address when the service runs open
    # the turns before `message` as (speaker, text), speakers as the model saw them ("" the user): the context
    # that produced the reply, which a reviewer reads and a feedback sample keeps
    history: list[tuple[str, str]] = field(default_factory=list)


TURN_FIELDS = [f.name for f in fields(TurnRecord)]


def _turn_columns_v1() -> list[sa.Column]:
    return [
        sa.Column("turn_id", sa.String(64), primary_key=True),
        sa.Column("conversation_id", sa.String(128), nullable=False, index=True),
        # stored as naive UTC: SQLite has no time zones, and comparisons must agree on both back ends
        sa.Column("time", sa.DateTime(timezone=False), nullable=False, index=True),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("reply", sa.Text, nullable=False),
        sa.Column("history_turns", sa.Integer, nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False, index=True),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("character", sa.String(200), nullable=False),
        sa.Column("engine", sa.String(64), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("new_tokens", sa.Integer, nullable=False),
        sa.Column("latency_s", sa.Float, nullable=False),
        sa.Column("ttft_s", sa.Float, nullable=True),
        sa.Column("finish_reason", sa.String(32), nullable=False),
    ]


metadata = sa.MetaData()

turns_table = sa.Table(
    "turns", metadata, *_turn_columns_v1(),
    sa.Column("client", sa.String(200), nullable=False, server_default=""),
    sa.Column("history", sa.Text, nullable=False, server_default="[]"),  # JSON: [[speaker, text], ...]
)

feedback_table = sa.Table(
    "feedback", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("turn_id", sa.String(64), sa.ForeignKey("turns.turn_id", ondelete="CASCADE"), nullable=False),
    sa.Column("time", sa.DateTime(timezone=False), nullable=False),
    sa.Column("rating", sa.SmallInteger, nullable=False),  # +1 | -1; one row per turn, the last rating given
    sa.Column("comment", sa.Text, nullable=True),
    sa.Column("review", sa.String(16), nullable=False, server_default="pending"),  # REVIEW_STATES
    sa.Column("reviewed_at", sa.DateTime(timezone=False), nullable=True),
    sa.Index("ux_feedback_turn_id", "turn_id", unique=True),
)

# who owns a conversation: the first client that wrote to it; a turn or a rating from another client is refused
conversations_table = sa.Table(
    "conversations", metadata,
    sa.Column("conversation_id", sa.String(128), primary_key=True),
    sa.Column("client", sa.String(200), nullable=False),
    sa.Column("time", sa.DateTime(timezone=False), nullable=False, index=True),  # first written, naive UTC
)


def _deleted_columns_v4() -> list[sa.Column]:
    return [sa.Column("conversation_id", sa.String(128), primary_key=True),
            sa.Column("time", sa.DateTime(timezone=False), nullable=False, index=True)]  # deleted at, naive UTC


# conversations deleted lately (castbot/chatlog/retention.py): a turn still being answered when its conversation was
# deleted is dropped when it finishes, not written back into a new conversation of the same id
deleted_table = sa.Table("deleted_conversations", metadata, *_deleted_columns_v4())

version_table = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))


def _migrate_to_1(conn: sa.Connection) -> None:
    """Version 1: turns and feedback as first written (no index on the feedback's turn)."""
    old = sa.MetaData()
    turns = sa.Table("turns", old, *_turn_columns_v1())
    turns.create(conn, checkfirst=True)
    for index in turns.indexes:
        index.create(conn, checkfirst=True)
    feedback = sa.Table(
        "feedback", old,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("turn_id", sa.String(64), sa.ForeignKey(turns.c.turn_id, ondelete="CASCADE"), nullable=False),
        sa.Column("time", sa.DateTime(timezone=False), nullable=False),
        sa.Column("rating", sa.SmallInteger, nullable=False),
        sa.Column("comment", sa.Text, nullable=True),
    )
    feedback.create(conn, checkfirst=True)


def _migrate_to_2(conn: sa.Connection) -> None:
    """Version 2: an index on feedback.turn_id (turns() joins on it; the monitor reads 100k turns)."""
    feedback = sa.Table("feedback", sa.MetaData(), sa.Column("turn_id", sa.String(64)))
    sa.Index("ix_feedback_turn_id", feedback.c.turn_id).create(conn, checkfirst=True)


def _add_column(conn: sa.Connection, table: str, column: str, ddl: str) -> None:
    """ALTER TABLE ... ADD COLUMN unless the column is there already (a log some tool touched by hand)."""
    if column not in {c["name"] for c in sa.inspect(conn).get_columns(table)}:
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")


def _migrate_to_3(conn: sa.Connection) -> None:
    """Version 3: who wrote each turn (client) and what it answered (history); conversations owned by their first
    client (earlier ones by the unknown client ''); one rating per turn (the last kept), with a review state."""
    _add_column(conn, "turns", "client", "VARCHAR(200) DEFAULT '' NOT NULL")
    _add_column(conn, "turns", "history", "TEXT DEFAULT '[]' NOT NULL")
    _add_column(conn, "feedback", "review", "VARCHAR(16) DEFAULT 'pending' NOT NULL")
    _add_column(conn, "feedback", "reviewed_at", "TIMESTAMP")
    latest = sa.select(sa.func.max(feedback_table.c.id)).group_by(feedback_table.c.turn_id).scalar_subquery()
    conn.execute(sa.delete(feedback_table).where(feedback_table.c.id.not_in(latest)))
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_feedback_turn_id")  # the unique index below replaces it
    for index in feedback_table.indexes:
        index.create(conn, checkfirst=True)
    conversations_table.create(conn, checkfirst=True)
    for index in conversations_table.indexes:
        index.create(conn, checkfirst=True)
    turns = turns_table.c
    first = (sa.select(turns.conversation_id, sa.func.min(turns.client), sa.func.min(turns.time))
             .group_by(turns.conversation_id))
    conn.execute(sa.insert(conversations_table).from_select(["conversation_id", "client", "time"], first))


def _migrate_to_4(conn: sa.Connection) -> None:
    """Version 4: deleted conversations, one row per id, so a turn that outlives its conversation is dropped."""
    deleted = sa.Table("deleted_conversations", sa.MetaData(), *_deleted_columns_v4())
    deleted.create(conn, checkfirst=True)
    for index in deleted.indexes:
        index.create(conn, checkfirst=True)


MIGRATIONS: list[Callable[[sa.Connection], None]] = [_migrate_to_1, _migrate_to_2, _migrate_to_3, _migrate_to_4]
SCHEMA_VERSION = len(MIGRATIONS)


def naive_utc(when: datetime) -> datetime:
    """A time as the log stores it: naive UTC (a naive time is taken as UTC already)."""
    if when.tzinfo is None:
        return when
    return when.astimezone(UTC).replace(tzinfo=None)


def utc_now() -> datetime:
    return naive_utc(datetime.now(UTC))


def turn_frame(rows, extra: list[str]) -> pd.DataFrame:
    """Rows of the turns table (+ `extra` columns) as a DataFrame: time in UTC, history as [[speaker, text], ...],
    rating (when among `extra`) as float with NaN where unrated."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=[*TURN_FIELDS, *extra])
    frame["time"] = pd.to_datetime(frame["time"]).dt.tz_localize("UTC")
    frame["history"] = [json.loads(h) if h else [] for h in frame["history"]]
    frame["ttft_s"] = frame["ttft_s"].astype("float64")
    if "rating" in frame:
        frame["rating"] = frame["rating"].astype("float64")
    return frame
