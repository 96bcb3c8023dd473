"""The chat log through a database outage: failed writes are counted and named without the password, and the log
reconnects once the database is back, including a log that was down when the service started."""

import prometheus_client
import pytest

from castbot.chatlog import ChatLog, ChatLogUnavailable
from castbot.chatlog.settings import mask_passwords, safe_url
from tests.chatlog.conftest import turn

pytestmark = pytest.mark.unit


def write_errors() -> float:
    return prometheus_client.REGISTRY.get_sample_value("castbot_chatlog_write_errors_total") or 0.0


def test_writes_fail_counted_during_an_outage_and_resume_after_it(postgres, postgres_url):
    log = ChatLog(postgres_url)
    log.retry_after_s = 0  # try the database on every call (the service fails fast for 2 s)
    log.record(turn(conversation="before", client="alice"))
    late = ChatLog(postgres_url, lazy=True)  # a replica that starts during the outage
    late.retry_after_s = 0
    errors = write_errors()
    postgres.stop()
    try:
        with pytest.raises(ChatLogUnavailable) as error:
            log.record(turn(conversation="during", client="alice"))
        assert ":pw@" not in str(error.value) and "castbot:***@127.0.0.1" in str(error.value)
        with pytest.raises(ChatLogUnavailable):
            late.record(turn(conversation="during", client="bob"))
        assert not log.ping() and not late.ping()
        assert write_errors() == errors + 2
    finally:
        postgres.start()
    log.record(turn(conversation="after", client="alice"))  # a fresh connection, no restart of the process
    late.record(turn(conversation="late", client="bob"))
    assert late.ping()
    assert sorted(log.turns()["conversation_id"]) == ["after", "before", "late"]
    assert write_errors() == errors + 2
    log.close()
    late.close()


def test_after_an_outage_calls_fail_fast_then_try_again(postgres, postgres_url, monkeypatch):
    log = ChatLog(postgres_url)
    postgres.stop()
    try:
        with pytest.raises(ChatLogUnavailable, match="unreachable"):
            log.add_feedback("t1", 1, None, client="alice")
        with pytest.raises(ChatLogUnavailable, match="unreachable moments ago; retrying after 2 s"):
            log.record(turn())  # no connection attempt: a down database costs a request microseconds, not 5 s
    finally:
        postgres.start()
    monkeypatch.setattr(log, "_down_until", 0.0)  # the 2 s have passed
    log.record(turn())
    assert len(log.turns()) == 1
    log.close()


def test_urls_and_driver_messages_are_shown_without_passwords():
    assert safe_url("postgresql+psycopg://castbot:s3cret@db:5432/chatlog") == "postgresql+psycopg://castbot:***@db:5432/chatlog"
    assert "s3cret" not in safe_url("postgresql+psycopg://castbot@db/chatlog?password=s3cret&sslmode=require")
    assert "sslmode=require" in safe_url("postgresql+psycopg://castbot@db/chatlog?password=s3cret&sslmode=require")
    assert safe_url("not a url") == "<unparsable URL>"
    assert mask_passwords("failed: host=db password=s3cret user=castbot and postgres://u:s3cret@db/x") == \
        "failed: host=db password=*** user=castbot and postgres://u:***@db/x"
    assert "s3cret" not in repr(ChatLog("postgresql+psycopg://castbot:s3cret@127.0.0.1:1/chatlog", lazy=True))
