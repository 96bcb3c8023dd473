"""What the conversation log forgets: a conversation its client deletes (and it stays deleted), and turns older than
the retention period (CASTBOT_CHATLOG_RETENTION_DAYS).

A deleted conversation leaves a row in deleted_conversations (its id and when) for TOMBSTONE_KEEP: a turn that was
still being answered when its conversation was deleted is dropped when it finishes (ChatLog.record), instead of
bringing the conversation back. A turn that begins after the deletion may use the id again.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from castbot.chatlog.schema import conversations_table, deleted_table, feedback_table, naive_utc, turns_table, utc_now
from castbot.chatlog.settings import mask_passwords, retention_days

logger = logging.getLogger("castbot.chatlog")

TOMBSTONE_KEEP = timedelta(days=1)  # far longer than a turn is ever in flight (minutes at most)


class ConversationDeleted(LookupError):
    """The turn's conversation was deleted after the turn began: nothing of it is written."""


class Retention:
    """ChatLog's deleting methods (ChatLog supplies _writing and _upsert)."""

    def delete_conversation(self, conversation_id: str, client: str | None = None) -> int:
        """Delete every turn of one conversation and its feedback; the number of turns deleted (0 when it does not
        exist or, client given, belongs to another client). A turn of it still being answered is not written."""
        with self._writing() as conn:
            owner = conn.execute(sa.select(conversations_table.c.client).with_for_update()  # waits for a record()
                                 .where(conversations_table.c.conversation_id == conversation_id)).first()
            if owner is None or (client is not None and owner.client != client):
                return 0
            removed = self._delete(conn, turns_table.c.conversation_id == conversation_id)
            conn.execute(sa.delete(conversations_table).where(conversations_table.c.conversation_id
                                                              == conversation_id))
            now = utc_now()
            conn.execute(self._upsert(deleted_table, conversation_id=conversation_id, time=now)
                         .on_conflict_do_update(index_elements=[deleted_table.c.conversation_id], set_={"time": now}))
            return removed

    def deleted_since(self, conversation_id: str, when: datetime) -> bool:
        """Whether the conversation was deleted at or after `when` (a scene then stops: castbot/serve/scenes.py)."""
        with self._reading() as conn:
            return self._deleted_since(conn, conversation_id, when)

    @staticmethod
    def _deleted_since(conn: sa.Connection, conversation_id: str, when: datetime) -> bool:
        """Whether the conversation was deleted at or after `when` (a turn that began then must not be written)."""
        return conn.execute(sa.select(deleted_table.c.conversation_id).where(
            deleted_table.c.conversation_id == conversation_id, deleted_table.c.time >= naive_utc(when))).first() \
            is not None

    def purge(self, older_than: timedelta) -> int:
        """Delete turns (and their feedback) older than `older_than`, conversations left without turns, and
        deletions older than TOMBSTONE_KEEP; the number of turns deleted."""
        cutoff = naive_utc(datetime.now(UTC) - older_than)
        with self._writing() as conn:
            removed = self._delete(conn, turns_table.c.time < cutoff)
            left = sa.select(turns_table.c.turn_id).where(
                turns_table.c.conversation_id == conversations_table.c.conversation_id)
            conn.execute(sa.delete(conversations_table).where(conversations_table.c.time < cutoff, ~left.exists()))
            self._forget_deletions(conn)
        return removed

    def purge_expired(self) -> int:
        """purge() to CASTBOT_CHATLOG_RETENTION_DAYS (default 30; when kept for ever, only old deletions go); turns
        deleted."""
        days = retention_days()
        if days is None:
            with self._writing() as conn:
                self._forget_deletions(conn)
            return 0
        removed = self.purge(timedelta(days=days))
        logger.info("chat log: purged %d turns older than %d days", removed, days)
        return removed

    def start_purging(self, every_s: float = 3600.0) -> threading.Event:
        """purge_expired() now and every `every_s` seconds in a daemon thread (never on an event loop); set the
        returned event to stop. A failed purge is logged and tried again at the next tick."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    self.purge_expired()
                except Exception as exc:  # the database down, a bad CASTBOT_CHATLOG_RETENTION_DAYS: keep serving
                    logger.error("chat log: purge failed: %s", mask_passwords(str(exc)))
                stop.wait(every_s)

        threading.Thread(target=loop, name="chatlog-purge", daemon=True).start()
        return stop

    @staticmethod
    def _forget_deletions(conn: sa.Connection) -> None:
        conn.execute(sa.delete(deleted_table).where(deleted_table.c.time < utc_now() - TOMBSTONE_KEEP))

    @staticmethod
    def _delete(conn: sa.Connection, condition) -> int:
        # feedback first: the foreign key's ON DELETE CASCADE is not enforced by SQLite connections without the
        # pragma (another tool's), so do not rely on it
        doomed = sa.select(turns_table.c.turn_id).where(condition)
        conn.execute(sa.delete(feedback_table).where(feedback_table.c.turn_id.in_(doomed)))
        return conn.execute(sa.delete(turns_table).where(condition)).rowcount
