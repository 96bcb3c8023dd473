"""The conversation log: every answered turn and its feedback, in SQLite by default or PostgreSQL.

    from castbot.chatlog.store import ChatLog, TurnRecord
    log = ChatLog.from_env()               # None when CASTBOT_CHATLOG=off
    log.record(TurnRecord(...))            # durable (committed) on return; safe from many threads
    log.add_feedback(turn_id, +1, "nice")  # False: no such turn
    log.turns(model_name="rick-bot", since=datetime(2026, 11, 1, tzinfo=timezone.utc))  # a DataFrame

Command line (exit 2 on bad arguments):

    python -m castbot.chatlog export --since 2026-11-01 [--model NAME] --out turns.parquet   # or .jsonl
    python -m castbot.chatlog delete --conversation ID
    python -m castbot.chatlog purge [--days N]    # default: CASTBOT_CHATLOG_RETENTION_DAYS (e.g. from cron)

Environment:
    CASTBOT_CHATLOG=off                   no log at all (from_env returns None)
    CASTBOT_CHATLOG_URL                   SQLAlchemy URL; default sqlite:///$CASTBOT_HOME/chatlog.db. PostgreSQL:
                                          postgresql+psycopg://USER:PASSWORD@HOST:5432/DB (extra `castbot[postgres]`)
    CASTBOT_CHATLOG_RETENTION_DAYS        turns older than this are deleted when the log opens (from_env) and by
                                          `purge`; unset: kept for ever

The schema is created on first use and carries its version in `schema_version`; MIGRATIONS lists the steps, so a
later change migrates an existing log instead of breaking it. Message text never goes into log lines.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import sqlalchemy as sa

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger("castbot.chatlog")


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


TURN_FIELDS = [f.name for f in fields(TurnRecord)]

metadata = sa.MetaData()

turns_table = sa.Table(
    "turns", metadata,
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
)

feedback_table = sa.Table(
    "feedback", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("turn_id", sa.String(64), sa.ForeignKey("turns.turn_id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("time", sa.DateTime(timezone=False), nullable=False),
    sa.Column("rating", sa.SmallInteger, nullable=False),  # +1 | -1; the last one given counts
    sa.Column("comment", sa.Text, nullable=True),
)

version_table = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))


def _migrate_to_1(conn: sa.Connection) -> None:
    """Version 1: turns and feedback as first written (no index on the feedback's turn)."""
    turns_table.create(conn, checkfirst=True)
    for index in turns_table.indexes:
        index.create(conn, checkfirst=True)
    feedback = sa.Table(
        "feedback", sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("turn_id", sa.String(64), sa.ForeignKey(turns_table.c.turn_id, ondelete="CASCADE"), nullable=False),
        sa.Column("time", sa.DateTime(timezone=False), nullable=False),
        sa.Column("rating", sa.SmallInteger, nullable=False),
        sa.Column("comment", sa.Text, nullable=True),
    )
    feedback.create(conn, checkfirst=True)


def _migrate_to_2(conn: sa.Connection) -> None:
    """Version 2: an index on feedback.turn_id (turns() joins on it; the monitor reads 100k turns)."""
    for index in feedback_table.indexes:
        index.create(conn, checkfirst=True)


# MIGRATIONS[i] takes a log at version i to version i + 1; append, never edit a released step
MIGRATIONS: list[Callable[[sa.Connection], None]] = [_migrate_to_1, _migrate_to_2]
SCHEMA_VERSION = len(MIGRATIONS)


def safe_url(url: str | sa.URL) -> str:
    """The URL as it may appear in a message: the password masked."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparsable URL>"


def default_url() -> str:
    """CASTBOT_CHATLOG_URL, else the SQLite file under the castbot state folder."""
    from castbot.common.settings import STATE_DIR

    return os.environ.get("CASTBOT_CHATLOG_URL") or f"sqlite:///{Path(STATE_DIR) / 'chatlog.db'}"


def _naive_utc(when: datetime) -> datetime:
    if when.tzinfo is None:
        return when  # taken as UTC already
    return when.astimezone(timezone.utc).replace(tzinfo=None)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    # WAL: readers (the monitor, an export) never block the service's writers. synchronous=NORMAL in WAL mode
    # syncs at checkpoints, not each commit: a committed turn is in the WAL file, so it survives kill -9 of
    # the process (the OS still holds the write); only a power loss or OS crash can drop the last commits.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")  # ms: another process (a CLI purge) may hold the write lock
    cursor.close()


class ChatLogError(RuntimeError):
    """The log cannot be opened; the message names the URL without its password."""


class ChatLog:
    """The conversation log at one SQLAlchemy URL; one engine shared by all threads."""

    def __init__(self, url: str):
        try:
            self.url = sa.make_url(url)
        except sa.exc.ArgumentError:
            raise ChatLogError("the chat log URL is not a SQLAlchemy URL (e.g. sqlite:///path/chatlog.db or "
                               "postgresql+psycopg://user:password@host:5432/db): fix CASTBOT_CHATLOG_URL") from None
        self._write_lock = threading.Lock()  # SQLite allows one writer: queue in Python, not in busy retries
        try:
            self.engine = self._engine()
            self._migrate()
        except ImportError as exc:
            raise ChatLogError(f"the chat log at {safe_url(self.url)} needs a driver that is not installed ({exc}): "
                               "for PostgreSQL, pip install 'castbot[postgres]'") from None
        except sa.exc.SQLAlchemyError as exc:
            raise ChatLogError(f"cannot open the chat log at {safe_url(self.url)}: "
                               f"{type(exc).__name__}: {getattr(exc, 'orig', None) or exc}") from None

    @classmethod
    def from_env(cls) -> ChatLog | None:
        """The log named by the environment (see the module docstring), purged to the retention period."""
        if os.environ.get("CASTBOT_CHATLOG", "on").strip().lower() in ("off", "0", "false", "no"):
            return None
        log = cls(default_url())
        days = retention_days()
        if days is not None:
            removed = log.purge(timedelta(days=days))
            logger.info("chat log: purged %d turns older than %d days", removed, days)
        return log

    def _engine(self) -> sa.Engine:
        # hide_parameters: a failed INSERT's exception would otherwise quote the user's message and the reply
        if self.url.get_backend_name() != "sqlite":
            # pool_pre_ping: a PostgreSQL restart must not fail the next requests
            return sa.create_engine(self.url, pool_size=8, max_overflow=16, pool_pre_ping=True, hide_parameters=True)
        database = self.url.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(self.url, pool_size=4, max_overflow=8, hide_parameters=True,
                                  connect_args={"check_same_thread": False, "timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, one step at a time, in one transaction with the version row."""
        with self._write_lock, self.engine.begin() as conn:
            # several processes (Bento workers, replicas) open one log at once: one migrates, the others wait
            if self.url.get_backend_name() == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(717171)"))  # released at commit
            elif self.url.get_backend_name() == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock before reading the version
            version_table.create(conn, checkfirst=True)
            current = conn.execute(sa.select(sa.func.max(version_table.c.version))).scalar()
            current = current or 0
            if current > SCHEMA_VERSION:
                raise ChatLogError(f"the chat log at {safe_url(self.url)} has schema version {current}, newer than "
                                   f"this castbot's {SCHEMA_VERSION}: upgrade castbot")
            for version in range(current, SCHEMA_VERSION):
                MIGRATIONS[version](conn)
                conn.execute(sa.delete(version_table))
                conn.execute(sa.insert(version_table).values(version=version + 1))
                logger.info("chat log: schema migrated to version %d", version + 1)

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(version_table.c.version))).scalar() or 0

    def _writer(self):
        """SQLite: one writer at a time (the lock); PostgreSQL takes concurrent writers itself."""
        return self._write_lock if self.url.get_backend_name() == "sqlite" else contextlib.nullcontext()

    def _write(self, statement) -> sa.CursorResult:
        with self._writer(), self.engine.begin() as conn:
            return conn.execute(statement)

    def record(self, turn: TurnRecord) -> None:
        """Insert one turn; committed when this returns."""
        row = asdict(turn)
        row["time"] = _naive_utc(turn.time)
        self._write(sa.insert(turns_table).values(**row))

    def add_feedback(self, turn_id: str, rating: int, comment: str | None = None) -> bool:
        """Store a rating (+1 or -1) of a turn; False when no such turn was logged."""
        if rating not in (1, -1):
            raise ValueError(f"rating must be +1 or -1, got {rating!r}")
        with self.engine.connect() as conn:
            known = conn.execute(sa.select(turns_table.c.turn_id).where(turns_table.c.turn_id == turn_id)).first()
        if not known:
            return False
        self._write(sa.insert(feedback_table).values(turn_id=turn_id, rating=rating, comment=comment,
                                                     time=_naive_utc(datetime.now(timezone.utc))))
        return True

    def turns(self, model_name: str | None = None, since: datetime | None = None,
              until: datetime | None = None) -> pd.DataFrame:
        """One row per turn, oldest first: TurnRecord's fields (time in UTC) + "rating" (the last given, +1/-1,
        else NaN) + "comment"."""
        import pandas as pd

        last = (sa.select(feedback_table.c.turn_id, sa.func.max(feedback_table.c.id).label("id"))
                .group_by(feedback_table.c.turn_id).subquery())
        query = (sa.select(turns_table, feedback_table.c.rating, feedback_table.c.comment)
                 .outerjoin(last, last.c.turn_id == turns_table.c.turn_id)
                 .outerjoin(feedback_table, feedback_table.c.id == last.c.id)
                 .order_by(turns_table.c.time, turns_table.c.turn_id))
        if model_name is not None:
            query = query.where(turns_table.c.model_name == model_name)
        if since is not None:
            query = query.where(turns_table.c.time >= _naive_utc(since))
        if until is not None:
            query = query.where(turns_table.c.time < _naive_utc(until))
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        frame = pd.DataFrame(rows, columns=[*TURN_FIELDS, "rating", "comment"])
        frame["time"] = pd.to_datetime(frame["time"]).dt.tz_localize("UTC")
        frame["rating"] = frame["rating"].astype("float64")  # NaN where unrated
        frame["ttft_s"] = frame["ttft_s"].astype("float64")
        return frame

    def delete_conversation(self, conversation_id: str) -> int:
        """Delete every turn of one conversation and its feedback; the number of turns deleted."""
        return self._delete(turns_table.c.conversation_id == conversation_id)

    def purge(self, older_than: timedelta) -> int:
        """Delete turns (and their feedback) older than `older_than`; the number of turns deleted."""
        cutoff = _naive_utc(datetime.now(timezone.utc) - older_than)
        return self._delete(turns_table.c.time < cutoff)

    def _delete(self, condition) -> int:
        # feedback first: the foreign key's ON DELETE CASCADE is not enforced by SQLite connections without the
        # pragma (another tool's), so do not rely on it
        doomed = sa.select(turns_table.c.turn_id).where(condition)
        with self._writer(), self.engine.begin() as conn:
            conn.execute(sa.delete(feedback_table).where(feedback_table.c.turn_id.in_(doomed)))
            return conn.execute(sa.delete(turns_table).where(condition)).rowcount

    def close(self) -> None:
        self.engine.dispose()


def retention_days() -> int | None:
    """CASTBOT_CHATLOG_RETENTION_DAYS as a positive whole number of days, or None when unset."""
    raw = os.environ.get("CASTBOT_CHATLOG_RETENTION_DAYS", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ChatLogError(f"CASTBOT_CHATLOG_RETENTION_DAYS={raw!r}: give a whole number of days >= 1, or unset it")
    return int(raw)


# ---- command line ----

def _iso_date(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date such as 2026-11-01 or "
                                         "2026-11-01T12:00:00+00:00") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _out_path(text: str) -> Path:
    path = Path(text)
    if path.suffix not in (".parquet", ".jsonl"):
        raise argparse.ArgumentTypeError(f"{text!r}: the output must end in .parquet or .jsonl")
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m castbot.chatlog",
                                     description="Export, delete or purge the chat log at CASTBOT_CHATLOG_URL "
                                                 "(default: chatlog.db under CASTBOT_HOME).")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write turns with their feedback to a .parquet or .jsonl file")
    export.add_argument("--since", type=_iso_date, required=True, help="first time included (ISO, UTC if no zone)")
    export.add_argument("--model", help="only turns of this registered model name")
    export.add_argument("--out", type=_out_path, required=True, help="turns.parquet or turns.jsonl")
    delete = commands.add_parser("delete", help="delete one conversation's turns and feedback")
    delete.add_argument("--conversation", required=True, help="the conversation id")
    purge = commands.add_parser("purge", help="delete turns older than N days")
    purge.add_argument("--days", type=_positive_int, help="default: CASTBOT_CHATLOG_RETENTION_DAYS")
    return parser


def export_turns(log: ChatLog, since: datetime, model: str | None, out: Path) -> int:
    """Write the turns (with rating and comment) since a time to parquet or JSONL; the number written."""
    frame = log.turns(model_name=model, since=since)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        frame.to_parquet(out, index=False)
    else:
        frame.to_json(out, orient="records", lines=True, date_format="iso", force_ascii=False)
    return len(frame)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # exits 2 with a message on bad arguments
    try:
        if args.command == "purge" and args.days is None:
            args.days = retention_days()
            if args.days is None:
                parser.error("purge needs --days N, or CASTBOT_CHATLOG_RETENTION_DAYS set")
        log = ChatLog(default_url())
    except ChatLogError as exc:
        print(f"castbot.chatlog: {exc}", file=sys.stderr)
        return 1
    if args.command == "export":
        n = export_turns(log, args.since, args.model, args.out)
        print(f"exported {n} turns to {args.out}")
    elif args.command == "delete":
        print(f"deleted {log.delete_conversation(args.conversation)} turns of conversation {args.conversation}")
    else:
        print(f"purged {log.purge(timedelta(days=args.days))} turns older than {args.days} days")
    log.close()
    return 0

