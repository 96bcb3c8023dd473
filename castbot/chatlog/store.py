"""The conversation log: every answered turn and its feedback, in SQLite by default or PostgreSQL.

    from castbot.chatlog import ChatLog, TurnRecord
    log = ChatLog.from_env()                     # None when CASTBOT_CHATLOG=off; lazy=True: opens on first use
    log.claim(conversation_id, client)           # before answering: NotOwner when another client owns it
    log.record(TurnRecord(..., client=..., history=[(speaker, text), ...]))   # committed on return; any thread
    log.add_feedback(turn_id, +1, "nice", client=...)   # False: no such turn, or not this client's
    log.delete_conversation(conversation_id, client=...)  # turns deleted; 0 for another client's conversation
    log.start_purging(every_s=3600)              # purge_expired() (CASTBOT_CHATLOG_RETENTION_DAYS) hourly
                                                 # (deleting and purging: castbot/chatlog/retention.py)
    log.turns(model_name="rick-bot", since=datetime(2026, 11, 1, tzinfo=timezone.utc))  # a DataFrame
    log.pending_reviews(); log.set_review([turn_id], "approved")  # castbot/chatlog/review.py

Every method blocks on the database: from async code call it in a worker thread (the service keeps a pool for it:
castbot/serve/turn_log.py). A method that cannot reach the database raises ChatLogUnavailable (the service answers
503) and the next call tries a fresh connection; each failed write counts in castbot_chatlog_write_errors_total.
client=None (the command line, the training flow) skips the ownership checks. The environment variables are
described in castbot/chatlog/settings.py.

The schema is created on first use and migrated step by step (castbot/chatlog/schema.py). Message text never goes
into log lines or exception messages, and a URL is only ever shown with its password masked (safe_url).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time as clock
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import prometheus_client
import sqlalchemy as sa

from castbot.chatlog.retention import ConversationDeleted, Retention
from castbot.chatlog.review import ReviewQueue
from castbot.chatlog.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    TurnRecord,
    conversations_table,
    feedback_table,
    naive_utc,
    turn_frame,
    turns_table,
    utc_now,
    version_table,
)
from castbot.chatlog.settings import (
    DEFAULT_RETENTION_DAYS,
    ChatLogError,
    default_url,
    mask_passwords,
    retention_days,
    safe_url,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ChatLog", "ChatLogError", "ChatLogUnavailable", "NotOwner", "TurnRecord", "MIGRATIONS", "SCHEMA_VERSION",
           "DEFAULT_RETENTION_DAYS", "WRITE_ERRORS", "default_url", "retention_days", "safe_url"]

logger = logging.getLogger("castbot.chatlog")

WRITE_ERRORS = prometheus_client.Counter(
    "castbot_chatlog_write_errors", "Writes to the conversation log that failed (turns, ratings, deletions, "
    "reviews); the next write opens a fresh connection.")


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


class ChatLogUnavailable(ChatLogError):
    """The database cannot be reached now (the service answers 503); the next call tries again."""


class NotOwner(LookupError):
    """The conversation belongs to another client (the service answers 403 to a turn, 404 to a rating)."""


# the database is down or unreachable: a fresh connection may work later (anything else is a bug or bad data)
_OUTAGES = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError, sa.exc.TimeoutError)


class ChatLog(ReviewQueue, Retention):
    """The conversation log at one SQLAlchemy URL; one engine shared by all threads."""

    retry_after_s = 2.0  # after an outage, calls fail fast for this long before a fresh connection is tried

    def __init__(self, url: str, *, lazy: bool = False):
        """lazy: do not touch the database yet; the schema is checked on first use (a log that is down at
        start-up is then reached once it comes up)."""
        try:
            self.url = sa.make_url(url)
        except sa.exc.ArgumentError:
            raise ChatLogError("the chat log URL is not a SQLAlchemy URL (e.g. sqlite:///path/chatlog.db or "
                               "postgresql+psycopg://user:password@host:5432/db): fix CASTBOT_CHATLOG_URL") from None
        self._write_lock = threading.Lock()  # SQLite allows one writer: queue in Python, not in busy retries
        self._open_lock = threading.Lock()
        self._opened = False
        self._down_until = 0.0  # clock.monotonic() before which calls fail fast
        try:
            self.engine = self._engine()
        except ImportError as exc:
            raise ChatLogError(f"the chat log at {safe_url(self.url)} needs a driver that is not installed ({exc}): "
                               "for PostgreSQL, pip install 'castbot[postgres]'") from None
        if not lazy:
            self._open()

    def __repr__(self) -> str:
        return f"ChatLog({safe_url(self.url)!r})"

    @classmethod
    def from_env(cls, *, lazy: bool = False) -> ChatLog | None:
        """The log named by the environment (see the module docstring), purged to the retention period unless
        lazy (then nothing touches the database until the first call)."""
        if os.environ.get("CASTBOT_CHATLOG", "on").strip().lower() in ("off", "0", "false", "no"):
            return None
        days = retention_days()  # a bad value fails now, not at the first purge
        log = cls(default_url(), lazy=lazy)
        if not lazy and days is not None:
            log.purge_expired()
        return log

    def _engine(self) -> sa.Engine:
        # hide_parameters: a failed INSERT's exception would otherwise quote the user's message and the reply
        if self.url.get_backend_name() != "sqlite":
            # pool_pre_ping: a PostgreSQL restart must not fail the next requests; connect_timeout: an outage
            # costs a worker thread seconds, not minutes
            args = {} if "connect_timeout" in self.url.query else {"connect_timeout": 5}
            return sa.create_engine(self.url, pool_size=8, max_overflow=16, pool_pre_ping=True, pool_timeout=10,
                                    hide_parameters=True, connect_args=args)
        database = self.url.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(self.url, pool_size=4, max_overflow=8, hide_parameters=True,
                                  connect_args={"check_same_thread": False, "timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine

    # ---- reaching the database ----

    def _unavailable(self, exc: Exception) -> ChatLogUnavailable:
        """Note an outage: drop pooled connections (the next call opens fresh ones) and fail fast for a while."""
        self.engine.dispose()
        self._opened = False  # check the schema again once it answers (it may have been down since start-up)
        self._down_until = clock.monotonic() + self.retry_after_s
        cause = mask_passwords(str(getattr(exc, "orig", None) or exc).splitlines()[0][:300])
        return ChatLogUnavailable(f"the chat log at {safe_url(self.url)} is unreachable: {type(exc).__name__}: "
                                  f"{cause}")

    def _open(self) -> None:
        """Create or migrate the schema once; ChatLogUnavailable while the database cannot be reached."""
        if self._opened:
            return
        if clock.monotonic() < self._down_until:
            raise ChatLogUnavailable(f"the chat log at {safe_url(self.url)} was unreachable moments ago; retrying "
                                     f"after {self.retry_after_s:g} s")
        with self._open_lock:
            if self._opened:
                return
            if clock.monotonic() < self._down_until:  # a thread before us just found it down
                raise ChatLogUnavailable(f"the chat log at {safe_url(self.url)} was unreachable moments ago; "
                                         f"retrying after {self.retry_after_s:g} s")
            try:
                self._migrate()
            except ImportError as exc:
                raise ChatLogError(f"the chat log at {safe_url(self.url)} needs a driver that is not installed "
                                   f"({exc}): for PostgreSQL, pip install 'castbot[postgres]'") from None
            except _OUTAGES as exc:
                raise self._unavailable(exc) from None
            except sa.exc.SQLAlchemyError as exc:
                raise ChatLogError(f"cannot open the chat log at {safe_url(self.url)}: {type(exc).__name__}: "
                                   f"{mask_passwords(str(getattr(exc, 'orig', None) or exc))}") from None
            self._opened = True

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, one step at a time, in one transaction with the version row."""
        with self._write_lock, self.engine.begin() as conn:
            # several processes (Bento workers, replicas) open one log at once: one migrates, the others wait
            if self.url.get_backend_name() == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(717171)"))  # released at commit
            elif self.url.get_backend_name() == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock before reading the version
            version_table.create(conn, checkfirst=True)
            current = conn.execute(sa.select(sa.func.max(version_table.c.version))).scalar() or 0
            if current > SCHEMA_VERSION:
                raise ChatLogError(f"the chat log at {safe_url(self.url)} has schema version {current}, newer than "
                                   f"this castbot's {SCHEMA_VERSION}: upgrade castbot")
            for version in range(current, SCHEMA_VERSION):
                MIGRATIONS[version](conn)
                conn.execute(sa.delete(version_table))
                conn.execute(sa.insert(version_table).values(version=version + 1))
                logger.info("chat log: schema migrated to version %d", version + 1)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sa.Connection]:
        self._open()
        try:
            with self.engine.connect() as conn:
                yield conn
        except _OUTAGES as exc:
            raise self._unavailable(exc) from None

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sa.Connection]:
        """One transaction, committed on exit; SQLite: one writer at a time (PostgreSQL takes concurrent writers)."""
        lock = self._write_lock if self.url.get_backend_name() == "sqlite" else contextlib.nullcontext()
        try:
            self._open()  # a log down since start-up: this write is lost, and counted
            with lock, self.engine.begin() as conn:
                yield conn
        except (NotOwner, ConversationDeleted):  # refused, not failed: nothing was written
            raise
        except _OUTAGES as exc:
            WRITE_ERRORS.inc()
            raise self._unavailable(exc) from None
        except Exception:
            WRITE_ERRORS.inc()
            raise

    def schema_version(self) -> int:
        with self._reading() as conn:
            return conn.execute(sa.select(sa.func.max(version_table.c.version))).scalar() or 0

    def ping(self) -> bool:
        """Whether the log answers now (for a readiness probe); never raises."""
        try:
            with self._reading() as conn:
                conn.execute(sa.select(1))
            return True
        except ChatLogError:
            return False

    # ---- ownership and writes ----

    def _upsert(self, table: sa.Table, **values):
        """An INSERT with ON CONFLICT clauses (SQLite's and PostgreSQL's insert; the log supports those two)."""
        backend = self.url.get_backend_name()
        if backend == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif backend == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            raise ChatLogError(f"the chat log supports SQLite and PostgreSQL, not {backend}")
        return insert(table).values(**values)

    def _own(self, conn: sa.Connection, conversation_id: str, client: str, when: datetime) -> None:
        """Claim an unowned conversation for `client`; NotOwner when another client has it. Its row stays locked
        (PostgreSQL) until the transaction ends: a delete_conversation() waits."""
        for _ in range(2):  # PostgreSQL: a row deleted while this waited for its lock is gone; claim the id afresh
            conn.execute(self._upsert(conversations_table, conversation_id=conversation_id, client=client,
                                      time=naive_utc(when)).on_conflict_do_nothing())
            owner = conn.execute(sa.select(conversations_table.c.client).with_for_update()
                                 .where(conversations_table.c.conversation_id == conversation_id)).scalar()
            if owner is not None:
                break
        if owner != client:
            raise NotOwner(f"conversation {conversation_id} belongs to another client")

    def owner(self, conversation_id: str) -> str | None:
        """The client that owns a conversation, or None when no turn of it was logged."""
        with self._reading() as conn:
            return conn.execute(sa.select(conversations_table.c.client)
                                .where(conversations_table.c.conversation_id == conversation_id)).scalar()

    def claim(self, conversation_id: str, client: str) -> None:
        """Before answering a turn: the conversation becomes `client`'s if nobody owns it; NotOwner when another
        client owns it (so the reply is refused before it is generated, not after)."""
        with self._writing() as conn:
            self._own(conn, conversation_id, client, datetime.now(UTC))

    def record(self, turn: TurnRecord) -> bool:
        """Insert one turn; True: committed. False (nothing written) when its conversation was deleted after the
        turn began; NotOwner (nothing written) when its conversation belongs to another client."""
        row = asdict(turn)
        row["time"] = naive_utc(turn.time)
        row["history"] = json.dumps([[speaker, text] for speaker, text in turn.history], ensure_ascii=False)
        try:
            with self._writing() as conn:
                self._own(conn, turn.conversation_id, turn.client, turn.time)
                if self._deleted_since(conn, turn.conversation_id, turn.time):
                    raise ConversationDeleted(turn.conversation_id)  # rolls back the claim _own may have made
                conn.execute(sa.insert(turns_table).values(**row))
        except ConversationDeleted:
            logger.info("chat log: turn %s not written: its conversation was deleted while it was answered",
                        turn.turn_id)
            return False
        return True

    def _turn_of(self, conn: sa.Connection, turn_id: str, client: str | None) -> bool:
        query = sa.select(turns_table.c.turn_id).where(turns_table.c.turn_id == turn_id)
        if client is not None:
            query = query.join(conversations_table,
                               conversations_table.c.conversation_id == turns_table.c.conversation_id
                               ).where(conversations_table.c.client == client)
        return conn.execute(query).first() is not None

    def add_feedback(self, turn_id: str, rating: int, comment: str | None = None, client: str | None = None) -> bool:
        """Rate a turn +1 or -1; the rating replaces the turn's earlier one (a changed rating is reviewed again).
        False when no such turn was logged, or (client given) it is not in one of that client's conversations."""
        if rating not in (1, -1):
            raise ValueError(f"rating must be +1 or -1, got {rating!r}")
        with self._writing() as conn:
            if not self._turn_of(conn, turn_id, client):
                return False
            statement = self._upsert(feedback_table, turn_id=turn_id, rating=rating, comment=comment,
                                     time=utc_now())
            excluded, c = statement.excluded, feedback_table.c
            same = c.rating == excluded.rating
            conn.execute(statement.on_conflict_do_update(index_elements=[c.turn_id], set_={
                "rating": excluded.rating, "comment": excluded.comment, "time": excluded.time,
                "review": sa.case((same, c.review), else_=sa.literal("pending")),
                "reviewed_at": sa.case((same, c.reviewed_at), else_=sa.null())}))
        return True

    # ---- reading ----

    def turns(self, model_name: str | None = None, since: datetime | None = None,
              until: datetime | None = None) -> pd.DataFrame:
        """One row per turn, oldest first: TurnRecord's fields (time in UTC, history as [[speaker, text], ...]) +
        "rating" (+1/-1, else NaN), "comment" and "review" (pending/approved/rejected, else None)."""
        query = (sa.select(turns_table, feedback_table.c.rating, feedback_table.c.comment, feedback_table.c.review)
                 .outerjoin(feedback_table, feedback_table.c.turn_id == turns_table.c.turn_id)
                 .order_by(turns_table.c.time, turns_table.c.turn_id))
        if model_name is not None:
            query = query.where(turns_table.c.model_name == model_name)
        if since is not None:
            query = query.where(turns_table.c.time >= naive_utc(since))
        if until is not None:
            query = query.where(turns_table.c.time < naive_utc(until))
        with self._reading() as conn:
            rows = conn.execute(query).mappings().all()
        return turn_frame(rows, ["rating", "comment", "review"])

    def close(self) -> None:
        self.engine.dispose()

