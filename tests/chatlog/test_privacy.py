"""What the log forgets and what an export shows: a 30-day default retention purged on demand, and a redacted export
without e-mail addresses, phone numbers or client names."""

import json
import time
from datetime import timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from castbot.chatlog.export import Redactor
from tests.chatlog.conftest import NOW, cli, turn

pytestmark = pytest.mark.unit


def test_purge_expired_keeps_30_days_by_default_and_everything_when_told(log, monkeypatch):
    monkeypatch.delenv("CASTBOT_CHATLOG_RETENTION_DAYS", raising=False)
    old, recent = turn(conversation="old", when=NOW - timedelta(days=31)), turn(conversation="new")
    ancient = turn(conversation="ancient", when=NOW - timedelta(days=400))
    for record in (old, recent, ancient):
        log.record(record)
    log.add_feedback(old.turn_id, 1, None)
    monkeypatch.setenv("CASTBOT_CHATLOG_RETENTION_DAYS", "forever")
    assert log.purge_expired() == 0
    monkeypatch.setenv("CASTBOT_CHATLOG_RETENTION_DAYS", "0")
    assert log.purge_expired() == 0
    monkeypatch.setenv("CASTBOT_CHATLOG_RETENTION_DAYS", "365")
    assert log.purge_expired() == 1
    monkeypatch.delenv("CASTBOT_CHATLOG_RETENTION_DAYS")
    assert log.purge_expired() == 1  # the 30-day default: callable again and again while the service runs
    assert list(log.turns()["turn_id"]) == [recent.turn_id]
    assert (log.owner("old"), log.owner("ancient"), log.owner("new")) == (None, None, "")  # no empty shells left


def test_start_purging_purges_again_while_the_service_runs(log, monkeypatch):
    monkeypatch.delenv("CASTBOT_CHATLOG_RETENTION_DAYS", raising=False)
    log.record(turn(conversation="kept"))

    def old_turns_gone(timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if set(log.turns()["conversation_id"]) == {"kept"}:
                return True
            time.sleep(0.02)
        return False

    stop = log.start_purging(every_s=0.1)
    try:
        log.record(turn(conversation="old", when=NOW - timedelta(days=31)))
        assert old_turns_gone()
        log.record(turn(conversation="older", when=NOW - timedelta(days=90)))  # written after the first purge
        assert old_turns_gone()
    finally:
        stop.set()


def test_a_deleted_conversation_is_remembered_for_a_day_then_purged(log, monkeypatch):
    """The ids of deleted conversations (kept so a turn still being answered is dropped) go after a day, also when
    every turn is kept for ever."""
    def deletions() -> list[str]:
        with log.engine.connect() as conn:
            return conn.execute(sa.text("select conversation_id from deleted_conversations order by 1")).scalars().all()

    for conversation in ("old", "new"):
        log.record(turn(conversation=conversation))
        assert log.delete_conversation(conversation) == 1
    with log.engine.begin() as conn:
        conn.execute(sa.text("update deleted_conversations set time = :t where conversation_id = 'old'"),
                     {"t": (NOW - timedelta(hours=25)).replace(tzinfo=None)})
    assert deletions() == ["new", "old"]
    monkeypatch.setenv("CASTBOT_CHATLOG_RETENTION_DAYS", "forever")
    assert log.purge_expired() == 0
    assert deletions() == ["new"]
    assert log.record(turn(conversation="new")) is False  # begun before its deletion: still dropped


def test_the_purge_command_uses_the_default_retention(log):
    log.record(turn(when=NOW - timedelta(days=45)))
    url = str(log.url)
    assert "keeps every turn: nothing purged" in cli("purge", url=url, retention_days="forever").stdout
    assert "purged 1 turns older than 30 days" in cli("purge", url=url).stdout


def test_the_redacted_export_masks_addresses_numbers_and_client_names(log, tmp_path):
    log.record(turn(conversation="a", client="alice", message="Mail me at alice.smith+bot@example.co.uk or call "
                    "+44 20 7946 0958, says alice from 10.0.0.7.",
                    history=[("", "I am Alice, (555) 123-4567."), ("Ada", "Noted, Alice.")]))
    log.record(turn(conversation="b", client="203.0.113.9", message="Bob here: bob@example.org, 555.123.4567.",
                    reply="Episode 42 of 2026, season 3.", when=NOW + timedelta(seconds=1)))
    log.add_feedback(log.turns()["turn_id"][0], 1, "alice liked it: alice@example.com", client="alice")
    url = str(log.url)
    result = cli("export", "--since", "2000-01-01", "--redact", "--out", str(tmp_path / "r.jsonl"), url=url)
    assert result.returncode == 0, result.stderr
    assert "exported 2 turns" in result.stdout and "(redacted)" in result.stdout
    text = (tmp_path / "r.jsonl").read_text(encoding="utf-8")
    for secret in ("alice", "Alice", "example", "7946", "123-4567", "555.123", "10.0.0.7", "203.0.113.9"):
        assert secret not in text, secret
    first, second = (json.loads(line) for line in text.splitlines())
    assert first["client"] == "client-1" and second["client"] == "client-2"
    assert first["message"] == "Mail me at [email] or call [phone], says client-1 from [address]."
    assert first["history"] == [["", "I am client-1, [phone]."], ["Ada", "Noted, client-1."]]
    assert first["comment"] == "client-1 liked it: [email]"
    assert second["reply"] == "Episode 42 of 2026, season 3."  # short numbers are not phone numbers

    plain = cli("export", "--since", "2000-01-01", "--out", str(tmp_path / "p.parquet"), url=url)
    assert plain.returncode == 0, plain.stderr
    exported = pd.read_parquet(tmp_path / "p.parquet")
    assert list(exported["client"]) == ["alice", "203.0.113.9"]  # without --redact the export is whole


def test_ipv6_addresses_are_masked_and_times_are_not():
    redactor = Redactor(["address:2001:db8:1:2::/64"])
    text = ("from 2001:db8:1:2::7, 2001:0DB8:85a3:0000:0000:8a2e:0370:7334 and fe80::1%eth0; [::1]:8080 and "
            "::ffff:192.0.2.1 mapped. Meet at 10:30:45, MAC 00:1a:2b:3c:4d:5e, ratio 3:2.")
    assert redactor.text(text) == ("from [address], [address] and [address]; [[address]]:8080 and [address] "
                                   "mapped. Meet at 10:30:45, MAC 00:1a:2b:3c:4d:5e, ratio 3:2.")
    assert redactor.client("address:2001:db8:1:2::/64") == "client-1"


def test_a_short_client_name_is_masked_in_its_column_only():
    redactor = Redactor(["al", "", "alice"])
    assert (redactor.client("al"), redactor.client("alice"), redactor.client("")) == ("client-1", "client-2", "")
    assert redactor.text("al and alice and Alice's palace") == "al and client-2 and client-2's palace"
    assert redactor.text(None) is None
