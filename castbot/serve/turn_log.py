"""The served turns in the conversation log (castbot/chatlog/store.py): each turn's ids, its row, and when it is
committed. Every route's turn is written here, once, whatever its finish_reason.

A turn is committed before its reply goes out (an acknowledged reply survives a crash), in one of the log's own
CHATLOG_THREADS worker threads; a turn the client abandoned is written without waiting. A failed write is counted and
logged, never raised: the reply still goes out. A turn whose conversation was deleted while it was answered is not
written: the conversation stays deleted. Each turn records its client (castbot/serve/access.py: CLIENT) and the
history that produced it; a conversation belongs to the client that started it, and only that client may add to it,
rate it or delete it.
"""

import asyncio
import contextvars
import functools
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from castbot.chatlog.store import ChatLog, ChatLogUnavailable, NotOwner, TurnRecord
from castbot.model.bot import Reply
from castbot.serve.access import CLIENT
from castbot.serve.metrics import CHATLOG_ERRORS, CHATLOG_WRITE
from castbot.serve.schemas import Prompt, conversation

PURGE_EVERY_S = 3600.0  # the retention (CASTBOT_CHATLOG_RETENTION_DAYS, default 30) is applied hourly
# threads of the log's own pool: a slow or unreachable log queues its calls there, never in asyncio's default pool,
# where prompts are built (castbot/serve/engines/base.py); a few suffice (a commit takes milliseconds)
CHATLOG_THREADS = 4


class NotYours(LookupError):
    """A conversation_id that another client started (the route answers 409)."""

logger = logging.getLogger("castbot.service")


def open_chatlog() -> ChatLog | None:
    """The conversation log from CASTBOT_CHATLOG*, or None when it is off or cannot be opened (logged, counted:
    the service answers without it rather than not at all)."""
    try:
        log = ChatLog.from_env(lazy=True)  # a database down at start-up is reached once it comes back
        if log is not None:
            log.start_purging(PURGE_EVERY_S)
        return log
    except Exception as exc:  # a bad URL, a database down: the error names it without the password
        CHATLOG_ERRORS.inc()
        logger.error("conversation log unavailable, turns are not logged: %s", exc)
        return None


def new_turn(conversation_id: str | None) -> dict[str, str]:
    """Ids of a turn about to be answered: its own, and its conversation's (the client's, or a new one)."""
    return {"turn_id": uuid.uuid4().hex, "conversation_id": conversation_id or uuid.uuid4().hex}


class TurnLog:
    """Writes the finished turns of one served model and engine to the conversation log (None: the log is off)."""

    def __init__(self, chatlog: ChatLog | None, identity: dict[str, str], engine_name: str):
        self.chatlog, self.identity, self.engine_name = chatlog, identity, engine_name
        self.pool = ThreadPoolExecutor(CHATLOG_THREADS, thread_name_prefix="castbot-chatlog")  # threads start on use

    async def _in_pool(self, method, *args):
        """method(*args) in the log's own threads (as asyncio.to_thread does in the default pool)."""
        call = functools.partial(contextvars.copy_context().run, method, *args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, call)

    async def open_turn(self, conversation_id: str | None) -> dict[str, str]:
        """new_turn(), after checking that a conversation the client names is its own (NotYours otherwise). A log
        that is off or down cannot tell, and the turn goes on (its write will be counted as failed)."""
        turn = new_turn(conversation_id)
        if conversation_id and self.chatlog is not None:
            try:
                await self._in_pool(self.chatlog.claim, conversation_id, CLIENT.get())
            except NotOwner:
                raise NotYours(f"conversation {conversation_id} belongs to another client: omit conversation_id "
                               "to start a new one") from None
            except Exception as exc:
                CHATLOG_ERRORS.inc()
                logger.error("conversation %s not claimed: %s", conversation_id, type(exc).__name__)
        return turn

    def ready(self) -> bool:
        """False while the log is on but unreachable (the replica's turns would not be kept)."""
        return self.chatlog is None or self.chatlog.ping()

    async def record(self, endpoint: str, prompt: Prompt, character: str, reply: Reply, started: float,
                     first_piece_at: float | None, turn: dict[str, str]) -> None:
        """started and first_piece_at are time.perf_counter() readings."""
        if self.chatlog is None:
            return
        row = self.row(endpoint, prompt, character, reply, started, first_piece_at, turn)
        if reply.finish_reason == "cancelled":
            self.pool.submit(self._write, row)
        else:
            await self._in_pool(self._write, row)

    def row(self, endpoint: str, prompt: Prompt, character: str, reply: Reply, started: float,
            first_piece_at: float | None, turn: dict[str, str]) -> TurnRecord:
        """The conversation log's row for a finished turn."""
        now = time.perf_counter()
        return TurnRecord(
            **turn, time=datetime.now(UTC) - timedelta(seconds=now - started), endpoint=endpoint.lstrip("/"),
            message=prompt.named_turns()[-1][1], reply=reply.reply, history_turns=len(prompt.turns) - 1,
            client=CLIENT.get(), history=conversation(prompt, character)[:-1],
            **{**self.identity, "character": character}, engine=self.engine_name,
            prompt_tokens=reply.prompt_tokens, new_tokens=reply.new_tokens,
            latency_s=now - started, ttft_s=None if first_piece_at is None else first_piece_at - started,
            finish_reason=reply.finish_reason)

    def _write(self, row: TurnRecord) -> None:
        started = time.perf_counter()
        try:
            written = self.chatlog.record(row)  # False: its conversation was deleted meanwhile (nothing to count)
        except Exception as exc:
            CHATLOG_ERRORS.inc()
            logger.error("turn %s not logged: %s", row.turn_id, type(exc).__name__)
            return
        if written:
            CHATLOG_WRITE.observe(time.perf_counter() - started)

    async def rate(self, turn_id: str, rating: int, comment: str | None) -> bool:
        """Store the client's rating of a turn of its own (the log is on; the latest rating replaces the earlier);
        False when the turn is not in the log or not the client's. The store's error is counted, logged without
        the user's words, and raised (ChatLogUnavailable: the log is down)."""
        return await self._call(self.chatlog.add_feedback, turn_id, rating, comment, CLIENT.get())

    async def forget(self, conversation_id: str) -> int:
        """Delete the client's own conversation (its turns and ratings); the turns deleted, 0 when it has none."""
        return await self._call(self.chatlog.delete_conversation, conversation_id, CLIENT.get())

    async def deleted_since(self, conversation_id: str, when: datetime) -> bool:
        """Whether the conversation was deleted at or after `when`; False when the log is off or cannot tell."""
        if self.chatlog is None:
            return False
        try:
            return await self._call(self.chatlog.deleted_since, conversation_id, when)  # counted and logged there
        except ChatLogUnavailable:
            return False

    async def _call(self, method, *args):
        try:
            return await self._in_pool(method, *args)
        except Exception as exc:
            CHATLOG_ERRORS.inc()
            logger.error("%s failed: %s", method.__name__, type(exc).__name__)
            if isinstance(exc, ChatLogUnavailable):
                raise
            raise ChatLogUnavailable(f"the conversation log failed: {type(exc).__name__}") from None
