"""Who may write, rate and delete what in the conversation log: the first client owns a conversation, on SQLite and on
a real PostgreSQL server; writes from worker threads leave the event loop free."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from castbot.chatlog import ChatLog, NotOwner
from tests.chatlog.conftest import turn

pytestmark = pytest.mark.unit


@pytest.fixture(params=["sqlite", "postgresql"])
def any_log(request, tmp_path) -> ChatLog:
    url = f"sqlite:///{tmp_path / 'chatlog.db'}" if request.param == "sqlite" else request.getfixturevalue(
        "postgres_url")
    log = ChatLog(url)
    yield log
    log.close()


def feedback_rows(log: ChatLog) -> list[tuple]:
    with log.engine.connect() as conn:
        return conn.execute(sa.text("select turn_id, rating, comment, review from feedback order by id")).all()


def test_the_first_client_owns_a_conversation_and_another_is_refused(any_log):
    alice = turn(conversation="c1", client="alice", history=[("", "Hello?"), ("Ada", "Hi.")])
    any_log.record(alice)
    intruder = turn(conversation="c1", client="bob", message="Say the password.")
    with pytest.raises(NotOwner, match="conversation c1 belongs to another client"):
        any_log.record(intruder)
    with pytest.raises(NotOwner):
        any_log.claim("c1", "bob")
    any_log.claim("c1", "alice")  # the owner's next turn
    any_log.claim("c2", "bob")  # a new conversation becomes bob's before its reply exists
    assert (any_log.owner("c1"), any_log.owner("c2"), any_log.owner("c3")) == ("alice", "bob", None)
    frame = any_log.turns()
    assert list(frame["turn_id"]) == [alice.turn_id]  # nothing of the refused turn was written
    assert frame.loc[0, "client"] == "alice" and frame.loc[0, "history"] == [["", "Hello?"], ["Ada", "Hi."]]


def test_a_client_rates_only_its_own_turns_once_each(any_log):
    mine, theirs = turn(conversation="a", client="alice"), turn(conversation="b", client="bob")
    any_log.record(mine)
    any_log.record(theirs)
    # bob cannot tell alice's turn from a turn that does not exist
    assert any_log.add_feedback(mine.turn_id, 1, "planted", client="bob") is False
    assert any_log.add_feedback("no-such-turn", 1, None, client="bob") is False
    for i in range(50):  # a client rating in a loop: one row, the latest rating
        assert any_log.add_feedback(mine.turn_id, 1 if i % 2 else -1, f"take {i}", client="alice")
    assert feedback_rows(any_log) == [(mine.turn_id, 1, "take 49", "pending")]
    assert any_log.set_review([mine.turn_id], "approved") == [mine.turn_id]
    any_log.add_feedback(mine.turn_id, 1, "still good", client="alice")  # the same rating keeps the approval
    assert feedback_rows(any_log)[0][3] == "approved"
    any_log.add_feedback(mine.turn_id, -1, None, client="alice")
    any_log.add_feedback(mine.turn_id, 1, None, client="alice")  # a changed rating is reviewed again
    assert feedback_rows(any_log)[0][3] == "pending"


def test_only_the_owner_deletes_a_conversation(any_log):
    first, second = turn(conversation="a", client="alice"), turn(conversation="a", client="alice")
    kept = turn(conversation="b", client="bob")
    for record in (first, second, kept):
        any_log.record(record)
    any_log.add_feedback(first.turn_id, 1, None, client="alice")
    any_log.add_feedback(kept.turn_id, -1, None, client="bob")
    assert any_log.delete_conversation("a", client="bob") == 0
    assert any_log.delete_conversation("missing", client="bob") == 0
    assert len(any_log.turns()) == 3
    assert any_log.delete_conversation("a", client="alice") == 2
    assert list(any_log.turns()["turn_id"]) == [kept.turn_id]
    assert [row[0] for row in feedback_rows(any_log)] == [kept.turn_id]
    assert any_log.owner("a") is None  # forgotten: the id is free again


def test_clients_racing_for_one_new_conversation_leave_exactly_one_owner(any_log):
    clients = [f"client-{i}" for i in range(16)]
    start = threading.Barrier(len(clients))

    def race(client: str) -> str | None:
        start.wait(timeout=60)  # all 16 claim the same new id at the same moment
        try:
            any_log.record(turn(conversation="contested", client=client))
            return client
        except NotOwner:
            return None

    with ThreadPoolExecutor(len(clients)) as pool:
        winners = [c for c in pool.map(race, clients) if c]
    assert len(winners) == 1 and any_log.owner("contested") == winners[0]
    assert list(any_log.turns()["client"]) == winners


def test_writes_from_worker_threads_leave_the_event_loop_free(log):
    """The service calls the log with asyncio.to_thread: 48 concurrent writes, and the loop still ticks."""

    async def main() -> tuple[float, int]:
        gaps, stop = [], asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        records = [turn(conversation=f"t{i}", client=f"k{i % 4}") for i in range(48)]
        await asyncio.gather(*(asyncio.to_thread(log.record, r) for r in records))
        await asyncio.gather(*(asyncio.to_thread(log.add_feedback, r.turn_id, 1, None, r.client) for r in records))
        stop.set()
        await ticking
        return max(gaps), len(gaps)

    worst, ticks = asyncio.run(main())
    assert ticks > 5, "the writes finished before the loop ticked: the race did not happen"
    assert worst < 0.5, f"the event loop stalled {worst:.3f} s while the log was written"
    frame = log.turns()
    assert len(frame) == 48 and (frame["rating"] == 1).all()


def test_a_turn_begun_before_its_conversation_was_deleted_is_not_written(any_log):
    answering = turn(conversation="a", client="alice", when=datetime.now(UTC))  # its reply is still generating
    any_log.record(turn(conversation="a", client="alice"))
    assert any_log.delete_conversation("a", client="alice") == 1
    assert any_log.record(answering) is False
    assert any_log.turns().empty and any_log.owner("a") is None  # not even an empty conversation is left
    later = turn(conversation="a", client="bob", when=datetime.now(UTC))
    assert any_log.record(later) is True  # a turn begun after the deletion may use the id again
    assert list(any_log.turns()["turn_id"]) == [later.turn_id] and any_log.owner("a") == "bob"


def finish_while_deleting(log: ChatLog, conversation: str, delay_s: float) -> tuple[int, list[bool]]:
    """16 turns of a claimed conversation, begun now, finish while its owner deletes it (after delay_s): the turns
    the deletion removed, and whether each turn was written."""
    log.claim(conversation, "alice")
    answering = [turn(conversation=conversation, client="alice", when=datetime.now(UTC)) for _ in range(16)]
    start = threading.Barrier(len(answering) + 1)

    def finish(index_and_record) -> bool:
        index, record = index_and_record
        start.wait(timeout=60)
        time.sleep(0.001 * index)  # spread over 16 ms, so the deletion lands among them even on a loaded machine
        return log.record(record)

    def delete() -> int:
        start.wait(timeout=60)
        time.sleep(delay_s)
        return log.delete_conversation(conversation, client="alice")

    with ThreadPoolExecutor(len(answering) + 1) as pool:
        deleting = pool.submit(delete)
        written = list(pool.map(finish, enumerate(answering)))
    return deleting.result(), written


def test_turns_finishing_while_their_conversation_is_deleted_never_bring_it_back(any_log):
    """Turns begun before their conversation's deletion finish while it is deleted: each is either deleted with it
    or dropped, never left behind. Rounds repeat until both outcomes happened (the race)."""
    outcomes = set()
    for round_ in range(20):
        deleted, written = finish_while_deleting(any_log, f"r{round_}", 0.002 * (round_ % 9))
        assert deleted == sum(written)  # the deletion took every turn written before it
        assert any_log.owner(f"r{round_}") is None
        assert f"r{round_}" not in set(any_log.turns()["conversation_id"]), f"round {round_}: it came back"
        outcomes |= set(written)
        if outcomes == {True, False} and round_ >= 3:
            break
    assert outcomes == {True, False}, f"every turn was {outcomes}: the race never happened"
