"""The service's side of the conversation log (castbot/serve/turn_log.py): its calls run in threads of its own, so a
slow log never delays prompt building, and a turn that outlives its deleted conversation does not bring it back.
(Here rather than in tests/serve: TurnLog is driven without a server.)"""

import asyncio
import sqlite3
import threading
import time

import prometheus_client
import pytest

from castbot.model.bot import Reply
from castbot.serve.access import CLIENT
from castbot.serve.schemas import Prompt
from castbot.serve.turn_log import CHATLOG_THREADS, TurnLog, new_turn

pytestmark = pytest.mark.unit

IDENTITY = {"model_name": "ada-bot", "model_version": "3"}
PROMPT, REPLY = Prompt(turns=["Where is the fuel?"]), Reply("In the numbers.", 17, 5, "stop")


def errors() -> float:
    return prometheus_client.REGISTRY.get_sample_value("castbot_chatlog_errors_total") or 0.0


def test_a_slow_log_leaves_prompt_building_its_threads(log):
    """64 turns wait on a SQLite file another process holds locked; a prompt, built with asyncio.to_thread in the
    default pool as castbot/serve/engines/base.py builds it, is still built at once, and no turn is lost."""
    turns = TurnLog(log, IDENTITY, "transformers")
    blocker = sqlite3.connect(log.url.database, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the write lock: every write of the log waits (busy_timeout 30 s)

    async def main() -> tuple[float, int, int]:
        writes = [asyncio.create_task(turns.record("/chat", PROMPT, "Ada", REPLY, time.perf_counter(), None,
                                                   new_turn(f"c{i}"))) for i in range(64)]
        await asyncio.sleep(0.3)
        started = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.to_thread(lambda: [1, 2, 3]), timeout=3)  # the prompt's token ids
            took = time.perf_counter() - started
        finally:
            stuck = sum(not write.done() for write in writes)
            threads = sum(t.name.startswith("castbot-chatlog") for t in threading.enumerate())
            blocker.execute("ROLLBACK")
        await asyncio.gather(*writes)
        return took, stuck, threads

    try:
        took, stuck, threads = asyncio.run(main())
    finally:
        blocker.close()
    assert stuck == 64, "the turns were written before the prompt was built: the log was never slow"
    assert took < 1.0, f"the prompt waited {took:.2f} s behind the conversation log"
    assert 0 < threads <= CHATLOG_THREADS
    assert len(log.turns()) == 64  # the queued turns were written once the lock went


def test_a_turn_answered_while_its_conversation_is_deleted_does_not_bring_it_back(log):
    """DELETE /conversations/{id} (TurnLog.forget) while the conversation's next turn is being answered: that turn is
    dropped when it finishes, without counting an error; a turn begun afterwards may use the id again."""
    turns = TurnLog(log, IDENTITY, "transformers")

    async def main() -> str:
        CLIENT.set("alice")
        first = await turns.open_turn(None)
        await turns.record("/chat", PROMPT, "Ada", REPLY, time.perf_counter(), None, first)
        conversation_id = first["conversation_id"]
        started = time.perf_counter()
        second = await turns.open_turn(conversation_id)  # claimed, then being answered...
        assert await turns.forget(conversation_id) == 1  # ...when its client deletes the conversation
        await turns.record("/chat/stream", PROMPT, "Ada", REPLY, started, started + 0.1, second)
        assert log.turns().empty and log.owner(conversation_id) is None, "the deleted conversation came back"
        third = await turns.open_turn(conversation_id)  # a new turn after the deletion starts it afresh
        await turns.record("/chat", PROMPT, "Ada", REPLY, time.perf_counter(), None, third)
        return third["turn_id"]

    before = errors()
    third = asyncio.run(main())
    assert errors() == before
    assert list(log.turns()["turn_id"]) == [third]
