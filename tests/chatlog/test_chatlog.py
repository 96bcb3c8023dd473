"""The conversation log (castbot/chatlog/store.py): a real SQLite file in WAL mode, a real PostgreSQL server where the
machine has one, and the command line in a subprocess."""

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from castbot.chatlog.store import MIGRATIONS, SCHEMA_VERSION, ChatLog, ChatLogError, TurnRecord
from tests.chatlog.conftest import NOW, cli, turn
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.unit


def test_a_turn_and_its_last_feedback_come_back(log):
    first, second = turn(), turn(conversation="c2", ttft_s=0.05, endpoint="chat/stream")
    log.record(first)
    log.record(second)
    assert log.add_feedback(first.turn_id, -1, None)
    assert log.add_feedback(first.turn_id, 1, "funny")  # changed their mind: the last rating counts
    assert not log.add_feedback("no-such-turn", 1, None)
    with log.engine.connect() as conn:  # one row per turn: rating in a loop does not grow the table
        assert conn.execute(sa.text("select count(*) from feedback")).scalar() == 1
    frame = log.turns()
    assert len(frame) == 2
    row = frame.set_index("turn_id").loc[first.turn_id]
    assert (row["rating"], row["comment"], row["message"], row["history_turns"]) == (1, "funny", first.message, 2)
    assert (row["client"], row["history"], row["review"]) == ("", [], "pending")
    assert row["time"] == pd.Timestamp(first.time)  # UTC in, UTC out
    assert pd.isna(frame.set_index("turn_id").loc[second.turn_id, "rating"])
    assert frame.set_index("turn_id").loc[second.turn_id, "ttft_s"] == 0.05
    with pytest.raises(ValueError, match="rating must be"):
        log.add_feedback(first.turn_id, 5, None)


def test_turns_filter_by_model_and_time(log):
    log.record(turn(model="ada-bot", when=NOW - timedelta(days=3)))
    log.record(turn(model="ada-bot", when=NOW - timedelta(hours=1)))
    log.record(turn(model="rick-bot", when=NOW - timedelta(hours=1)))
    assert len(log.turns(model_name="ada-bot")) == 2
    assert len(log.turns(model_name="ada-bot", since=NOW - timedelta(days=1))) == 1
    assert len(log.turns(until=NOW - timedelta(days=1))) == 1


def test_64_concurrent_writers_land_exactly_64_rows(log):
    start = threading.Barrier(64)

    def write(i: int) -> str:
        record = turn(conversation=f"c{i}")
        start.wait(timeout=60)  # all 64 threads write at the same moment
        log.record(record)
        return record.turn_id

    with ThreadPoolExecutor(64) as pool:
        ids = list(pool.map(write, range(64)))
    frame = log.turns()
    assert len(frame) == 64 and set(frame["turn_id"]) == set(ids)


def test_delete_conversation_and_purge_remove_turns_with_their_feedback(log):
    old, kept, other = turn(when=NOW - timedelta(days=40)), turn(), turn(conversation="c9")
    for record in (old, kept, other):
        log.record(record)
    log.add_feedback(other.turn_id, 1, None)
    assert log.delete_conversation("c9") == 1
    assert log.delete_conversation("c9") == 0
    assert log.purge(timedelta(days=30)) == 1
    assert list(log.turns()["turn_id"]) == [kept.turn_id]
    with log.engine.connect() as conn:
        assert conn.execute(sa.text("select count(*) from feedback")).scalar() == 0


def test_sqlite_runs_in_wal_mode(log):
    with log.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_version_1_log_with_rows_is_migrated_without_losing_them(tmp_path, request, backend):
    """Write the schema as version 1 left it, with a rated turn, then open it with today's code."""
    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        MIGRATIONS[0](conn)
        conn.exec_driver_sql("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.exec_driver_sql("INSERT INTO schema_version VALUES (1)")
        conn.exec_driver_sql(
            "INSERT INTO turns VALUES ('t1', 'c1', '2026-11-20 10:00:00.000000', 'chat', 'hi', 'hello', 0, "
            "'ada-bot', '1', 'Ada', 'transformers', 3, 2, 0.5, NULL, 'stop')")
        for rating, comment in [(-1, "bad"), (1, "good")]:  # then, each rating was a row; the last one counted
            conn.exec_driver_sql("INSERT INTO feedback (turn_id, time, rating, comment) "
                                 f"VALUES ('t1', '2026-11-20 10:01:00.000000', {rating}, '{comment}')")
        assert "ix_feedback_turn_id" not in {i["name"] for i in sa.inspect(conn).get_indexes("feedback")}
    engine.dispose()

    log = ChatLog(url)
    assert log.schema_version() == SCHEMA_VERSION > 1
    [row] = log.turns().to_dict("records")
    assert (row["turn_id"], row["message"], row["rating"], row["comment"]) == ("t1", "hi", 1, "good")
    assert (row["client"], row["history"], row["review"]) == ("", [], "pending")  # the new columns' defaults
    assert log.owner("c1") == ""  # an old conversation belongs to the unknown client
    with log.engine.connect() as conn:
        indexes = {i["name"]: bool(i["unique"]) for i in sa.inspect(conn).get_indexes("feedback")}
        assert indexes == {"ux_feedback_turn_id": True}
        assert conn.execute(sa.text("select count(*) from schema_version")).scalar() == 1
        assert conn.execute(sa.text("select count(*) from feedback")).scalar() == 1  # the last rating kept
        assert conn.execute(sa.text("select count(*) from deleted_conversations")).scalar() == 0  # version 4
    log.close()
    reopened = ChatLog(url)
    assert reopened.schema_version() == SCHEMA_VERSION  # reopening migrates nothing twice
    reopened.close()


def test_a_log_newer_than_the_code_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    ChatLog(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")
    engine.dispose()
    with pytest.raises(ChatLogError, match="newer than this castbot's.*upgrade castbot"):
        ChatLog(url)


def test_from_env_off_default_place_and_retention(tmp_path, monkeypatch):
    import castbot.common.settings

    monkeypatch.delenv("CASTBOT_CHATLOG_RETENTION_DAYS", raising=False)
    monkeypatch.setenv("CASTBOT_CHATLOG", "off")
    assert ChatLog.from_env() is None
    monkeypatch.delenv("CASTBOT_CHATLOG")
    monkeypatch.delenv("CASTBOT_CHATLOG_URL", raising=False)
    monkeypatch.setattr(castbot.common.settings, "STATE_DIR", tmp_path / "state")
    log = ChatLog.from_env()
    log.record(turn(when=NOW - timedelta(days=10)))
    log.record(turn())
    log.close()
    assert (tmp_path / "state" / "chatlog.db").is_file()
    assert len(ChatLog.from_env().turns()) == 2  # kept: the default retention is 30 days
    monkeypatch.setenv("CASTBOT_CHATLOG_RETENTION_DAYS", "7")
    assert len(ChatLog.from_env().turns()) == 1  # the 10-day-old turn was purged on start
    monkeypatch.setenv("CASTBOT_CHATLOG_RETENTION_DAYS", "a week")
    with pytest.raises(ChatLogError, match="CASTBOT_CHATLOG_RETENTION_DAYS='a week'"):
        ChatLog.from_env()


def test_an_unreachable_database_is_named_without_its_password():
    port = free_port()  # nothing listens there
    with pytest.raises(ChatLogError) as error:
        ChatLog(f"postgresql+psycopg://castbot:s3cret-pw@127.0.0.1:{port}/chatlog?connect_timeout=2")
    assert "s3cret-pw" not in str(error.value)
    assert f"postgresql+psycopg://castbot:***@127.0.0.1:{port}/chatlog" in str(error.value)


WRITER = """
import sys, uuid
from datetime import datetime, timezone
from castbot.chatlog.store import ChatLog, TurnRecord
log = ChatLog(sys.argv[1])
for i in range(20):
    log.record(TurnRecord(uuid.uuid4().hex, "kill", datetime.now(timezone.utc), "chat", "m", "r", 0, "ada-bot", "1",
                          "Ada", "transformers", 1, 1, 0.1, None, "stop"))
    print(i, flush=True)  # the client has its reply once this is printed
import time; time.sleep(60)
"""


def test_turns_committed_before_kill_9_survive_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'chatlog.db'}"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, url], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        acknowledged = [proc.stdout.readline() for _ in range(20)]
        assert acknowledged[-1].strip() == "19"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(ChatLog(url).turns()) == 20


def test_cli_exports_deletes_and_purges(tmp_path, log):
    url = str(log.url)
    liked = turn(conversation="keep", message="Naïve? Never.")
    log.record(liked)
    log.record(turn(conversation="gone", model="rick-bot"))
    log.record(turn(conversation="keep", when=NOW - timedelta(days=100)))
    log.add_feedback(liked.turn_id, 1, "so Ada")

    since = (NOW - timedelta(days=1)).date().isoformat()
    out = tmp_path / "out" / "t.parquet"
    result = cli("export", "--since", since, "--model", "ada-bot", "--out", str(out), url=url)
    assert result.returncode == 0, result.stderr
    assert "exported 1 turns" in result.stdout
    exported = pd.read_parquet(tmp_path / "out" / "t.parquet")
    assert list(exported["turn_id"]) == [liked.turn_id] and exported["rating"].tolist() == [1]

    result = cli("export", "--since", "2000-01-01", "--out", str(tmp_path / "t.jsonl"), url=url)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and {r["message"] for r in rows} >= {"Naïve? Never."}

    assert "deleted 1 turns" in cli("delete", "--conversation", "gone", url=url).stdout
    assert "purged 1 turns older than 30 days" in cli("purge", "--days", "30", url=url).stdout
    assert "purged 0 turns older than 7 days" in cli("purge", url=url, retention_days="7").stdout
    assert list(log.turns()["turn_id"]) == [liked.turn_id]


@pytest.mark.parametrize("args, message", [
    (["export", "--since", "last week", "--out", "t.parquet"], "is not an ISO date"),
    (["export", "--since", "2026-11-01", "--out", "t.csv"], "must end in .parquet or .jsonl"),
    (["export", "--out", "t.parquet"], "the following arguments are required: --since"),
    (["purge", "--days", "0"], "is not a whole number >= 1"),
    (["delete"], "the following arguments are required: --conversation"),
    (["review", "--approve"], "expected at least one argument"),
    (["review", "--approve", "t1", "--reject", "t1"], "both approved and rejected: t1"),
    (["export", "--since", "2026-11-01", "--out", "t.jsonl", "--redact=yes"], "ignored explicit argument"),
    (["vacuum"], "invalid choice"),
])
def test_cli_refuses_bad_arguments_with_exit_2(tmp_path, args, message):
    result = cli(*args, url=f"sqlite:///{tmp_path / 'chatlog.db'}")
    assert result.returncode == 2
    assert message in result.stderr


def test_postgresql_holds_the_same_log(postgres_url):
    log = ChatLog(postgres_url)
    assert log.schema_version() == SCHEMA_VERSION
    start = threading.Barrier(64)

    def write(i: int) -> TurnRecord:
        record = turn(conversation=f"pg{i}", ttft_s=0.01 * i)
        start.wait(timeout=60)
        log.record(record)
        return record

    with ThreadPoolExecutor(64) as pool:
        records = list(pool.map(write, range(64)))
    assert log.add_feedback(records[0].turn_id, -1, "off")
    frame = log.turns(model_name="ada-bot", since=NOW - timedelta(minutes=1))
    assert len(frame) == 64 and frame.set_index("turn_id").loc[records[0].turn_id, "rating"] == -1
    assert log.delete_conversation("pg0") == 1
    assert ChatLog(postgres_url).schema_version() == SCHEMA_VERSION  # a second replica opens it unchanged
    log.close()


def test_a_failed_write_does_not_quote_the_message_and_a_bad_url_is_explained(log):
    record = turn(message="my secret plan for the moon")
    log.record(record)
    with pytest.raises(sa.exc.IntegrityError) as error:
        log.record(record)  # the same turn id twice
    assert "secret plan" not in str(error.value)
    with pytest.raises(ChatLogError, match="not a SQLAlchemy URL.*fix CASTBOT_CHATLOG_URL") as error:
        ChatLog("chatlog.db?password=hunter2")
    assert "hunter2" not in str(error.value)


def test_processes_opening_a_new_log_at_once_migrate_it_once(tmp_path):
    """Bento workers start together: each creates the schema if missing, and none trips over another."""
    url = f"sqlite:///{tmp_path / 'chatlog.db'}"
    opener = "import sys; from castbot.chatlog.store import ChatLog; ChatLog(sys.argv[1]).close()"
    procs = [subprocess.Popen([sys.executable, "-c", opener, url], cwd=REPO, stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 6, errors
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("select version from schema_version")).scalars().all() == [SCHEMA_VERSION]
    engine.dispose()
