"""The monitor's checks (castbot/scores/drift.py) on real transcripts: the same show's held-out episodes are not drift,
another show or another language is; a handful of turns gives no verdict; bad replies and errors degrade."""

import random
from datetime import UTC, datetime

import pandas as pd
import pytest

from castbot.config.monitor import MonitorConfig
from castbot.config.profile import load_profile
from castbot.scores.drift import health_checks, reply_checks, window_checks
from tasks.data.freshness import INPUTS_TAG, inputs_key, unchanged_since
from tasks.monitor.steps import alarms
from tasks.release.trained_on import build_reference, oov_rate, user_side
from tests.conftest import REPO

pytestmark = pytest.mark.unit


def splits_of(profile: str):
    from tasks.data.clean import clean_transcript
    from tasks.data.dialogues import build_dialogues
    from tasks.data.ingest import load_transcript

    config = load_profile(REPO / "configs" / profile)
    cleaned, _ = clean_transcript.fn(load_transcript.fn(config.data), config.cleaning)
    return config, cleaned, build_dialogues.fn(cleaned, config.character, config.dialogue, config.training.seed)


@pytest.fixture(scope="module")
def rick(shared_data):
    """The Rick reference (clean file's training episodes) and the held-out episodes' user side."""
    config, _, splits = splits_of("rick-and-morty.yaml")
    reference = build_reference(splits, config.character, 2000, seed=0)
    held_out = [text for name in ("validation", "test") for text, _ in user_side(splits[name], config.character)]
    return reference, held_out


def turns_frame(messages: list[str], replies: list[str] | None = None, **columns) -> pd.DataFrame:
    """Logged turns as castbot.chatlog.store's turns() returns them (the columns the checks read)."""
    n = len(messages)
    frame = pd.DataFrame({"message": messages, "reply": replies or ["Morty, I gotta go, Morty."] * n,
                          "time": [datetime.now(UTC)] * n, "model_version": ["1"] * n,
                          "finish_reason": ["stop"] * n, "latency_s": [0.5] * n, "rating": [float("nan")] * n,
                          "client": [f"client-{i % 5}" for i in range(n)]})  # five API keys, turn about
    return frame.assign(**columns)


def verdicts(checks) -> dict[str, str]:
    return {c.name: c.verdict for c in checks}


def test_held_out_episodes_of_the_same_show_are_not_drift(rick):
    reference, held_out = rick
    # every held-out line (81): fewer than the default window needs, so the test lowers it
    checks = window_checks(reference, turns_frame(held_out), MonitorConfig(min_turns=50))
    assert verdicts(checks)["drift"] == "no", [c.line() for c in checks]
    assert verdicts(checks)["vocabulary"] == "ok" and verdicts(checks)["length"] == "ok"
    drift = next(c for c in checks if c.name == "drift")
    assert drift.line().startswith("drift: no (AUC ") and f"{len(held_out)} turns" in drift.line()


def test_another_show_is_drift(rick):
    reference, _ = rick
    _, lotr, _ = splits_of("lotr.yaml")
    lines = random.Random(0).sample(lotr["line"].astype(str).tolist(), 100)
    checks = window_checks(reference, turns_frame(lines), MonitorConfig())
    drift = checks[0]
    assert drift.verdict == "yes" and drift.alarm, drift.line()
    assert drift.figures["drift_auc"] > drift.figures["drift_threshold"] >= MonitorConfig().min_drift_auc
    assert checks[-1].line() == "clients: ok (5 distinct clients in the window, monitor.min_clients=3)"
    assert alarms(checks)["drifted"] == [drift]


def test_drift_from_fewer_clients_than_min_clients_raises_no_event(rick):
    """The same off-show traffic sent by two API keys: the figures are kept, the verdict says why there is no
    event, and the monitor flow's event step finds nothing to send."""
    reference, _ = rick
    _, lotr, _ = splits_of("lotr.yaml")
    lines = random.Random(0).sample(lotr["line"].astype(str).tolist(), 100)
    two = turns_frame(lines, client=["mallory", "eve"] * 50)
    checks = window_checks(reference, two, MonitorConfig())
    drift, clients = checks[0], checks[-1]
    assert drift.line().startswith("drift: not enough clients: 2 of 3 (would read yes: AUC "), drift.line()
    assert not drift.alarm and drift.figures["drift_auc"] > drift.figures["drift_threshold"]
    assert clients.line() == "clients: not enough clients: 2 of 3 (2 distinct clients in the window, " \
                             "monitor.min_clients=3)"
    assert alarms(checks) == {"drifted": [], "degraded": []}
    [drift, *_] = window_checks(reference, two, MonitorConfig(min_clients=2))
    assert drift.verdict == "yes" and drift.alarm  # a deployment with two keys may ask for two


def test_another_language_is_drift_and_out_of_vocabulary(rick):
    from tasks.data.ingest import read_chatterbot

    reference, _ = rick
    spanish = read_chatterbot("chatterbot:spanish")["line"].astype(str).tolist()
    checks = window_checks(reference, turns_frame(random.Random(0).sample(spanish, 100)), MonitorConfig())
    assert verdicts(checks)["drift"] == "yes" and verdicts(checks)["vocabulary"] == "shifted", \
        [c.line() for c in checks]


def test_a_few_turns_give_not_enough_data(rick):
    reference, held_out = rick
    [check] = window_checks(reference, turns_frame(held_out[:12]), MonitorConfig())
    assert check.line() == "window: not enough data (12 turns < monitor.min_turns=100)" and not check.alarm


def test_the_classifier_sees_a_capped_sample_and_says_so(rick):
    reference, held_out = rick
    many = [f"{message} ({i})" for i in range(40) for message in held_out]  # 3k distinct messages
    [drift, *_] = window_checks(reference, turns_frame(many), MonitorConfig(classifier_cap=300, permutations=3))
    assert f"{len(many)} turns, {len(set(many))} distinct, classifier on a sample of 300" in drift.line()


def test_a_message_repeated_many_times_is_not_drift(rick):
    """The same held-out lines replayed 10 times over: repeats must not let the classifier learn them by heart."""
    reference, held_out = rick
    [drift, *_] = window_checks(reference, turns_frame(held_out * 10), MonitorConfig())
    assert drift.verdict == "no", drift.line()
    assert f"{len(held_out) * 10} turns, {len(set(held_out))} distinct" in drift.line()


def test_looping_replies_and_errors_degrade_the_bot(rick):
    reference, held_out = rick
    n = len(held_out)
    loops = ["the portal the portal the portal the portal"] * n
    reasons = ["error"] * 5 + ["stop"] * (n - 5)
    ratings = [-1.0] * 8 + [1.0] * 4 + [float("nan")] * (n - 12)
    frame = turns_frame(held_out, loops, finish_reason=reasons, rating=ratings,
                        latency_s=[0.2] * (n - 10) + [30.0] * 10)
    checks = {c.name: c for c in [*reply_checks(reference, frame, MonitorConfig()),
                                  *health_checks(frame, MonitorConfig())]}
    assert checks["degeneracy"].verdict == "degraded" and "repeat3_rate 1.000 > 0.500" in checks["degeneracy"].line()
    assert checks["errors"].verdict == "degraded" and checks["errors"].figures["errors_rate"] == pytest.approx(5 / n)
    assert checks["thumbs_down"].verdict == "degraded" and "0.667 of 12 rated turns" in checks["thumbs_down"].line()
    assert checks["latency"].verdict == "degraded" and checks["latency"].figures["latency_p95_s"] == 30.0
    assert checks["cancelled"].verdict == "ok"


def test_one_client_cancelling_or_asking_for_one_token_cannot_degrade_the_bot(rick):
    """One key cancels every stream, another asks for max_new_tokens=1 and rates every reply down: the window's
    rates cross their limits but through one client each, so no 'degraded' event; three such clients do."""
    reference, held_out = rick
    n = len(held_out)
    good = reference["character_lines"][:n]
    # mallory sends 30% of the turns, trudy 50% (most of the answered ones), alice and bob 10% each
    cycle = ["mallory"] * 3 + ["trudy"] * 5 + ["alice", "bob"]
    clients = [cycle[i % len(cycle)] for i in range(n)]
    reasons = ["cancelled" if c == "mallory" else "length" if c == "trudy" else "stop" for c in clients]
    replies = ["Wubba" if c == "trudy" else reply for c, reply in zip(clients, good)]
    ratings = [-1.0 if c == "trudy" else float("nan") for c in clients]
    frame = turns_frame(held_out, replies, finish_reason=reasons, client=clients, rating=ratings)
    checks = {c.name: c for c in [*reply_checks(reference, frame, MonitorConfig()),
                                  *health_checks(frame, MonitorConfig())]}
    for name in ("cancelled", "degeneracy", "thumbs_down"):
        assert checks[name].verdict == "not enough clients: 1 of 3" and not checks[name].alarm, checks[name].line()
    assert checks["cancelled"].figures["cancelled_rate"] > MonitorConfig().max_cancelled_rate
    assert "max_tokens_rate 0.7" in checks["degeneracy"].line() and "> 0.500 (1 clients)" in checks["degeneracy"].line()
    assert checks["thumbs_down"].figures["thumbs_down_rate"] == 1.0
    assert checks["cancelled"].line().endswith(", 1 clients past it)")

    three = ["mallory", "trudy", "alice"]  # now most clients' own streams are cancelled: that is the bot's doing
    frame = turns_frame(held_out, good, finish_reason=["cancelled" if c in three else "stop" for c in clients],
                        client=clients)
    cancelled = next(c for c in health_checks(frame, MonitorConfig()) if c.name == "cancelled")
    assert cancelled.verdict == "degraded" and cancelled.alarm and cancelled.figures["cancelled_clients_over"] == 3


def test_healthy_replies_pass_and_few_ratings_are_not_judged(rick):
    reference, held_out = rick
    frame = turns_frame(held_out, reference["character_lines"][:len(held_out)])
    checks = {c.name: c for c in [*reply_checks(reference, frame, MonitorConfig()),
                                  *health_checks(frame, MonitorConfig())]}
    assert checks["degeneracy"].verdict == "ok" and checks["errors"].verdict == "ok"
    assert checks["thumbs_down"].verdict == "not enough data"
    assert checks["likeness"].figures["likeness"] > 0.5  # real Rick lines read as Rick


def test_reference_holds_a_seeded_sample_and_the_held_out_oov_baseline(rick):
    reference, held_out = rick
    assert len(reference["contexts"]) == reference["train_contexts"] <= 2000
    assert 0 < reference["oov_baseline"] < 0.5
    assert reference["oov_baseline"] == pytest.approx(oov_rate(held_out, set(reference["vocabulary"])))


def test_unchanged_inputs_name_the_version_and_a_change_does_not():
    key = inputs_key({"data": "a" * 64, "config": "b" * 64, "code": "c"})
    versions = [("champion", "3", {INPUTS_TAG: key}), ("latest", "4", {})]
    assert unchanged_since(versions, key).startswith("nothing new since champion version 3")
    other = inputs_key({"data": "d" * 64, "config": "b" * 64, "code": "c"})
    assert unchanged_since(versions, other) is None
    assert unchanged_since([("champion", "1", {})], key) is None  # registered before the tag existed
