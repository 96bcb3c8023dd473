"""A cast model's monitor end to end: the tiny show's cast trained by the real flow (its registered version carries
each member's reference), a real SQLite chat log in which one member is sent another show's lines, and the monitor
CLI on a real MLflow and Prefect test server: that member alone is flagged, in the printout, the MLflow run's
per-member metrics and tags, the Prefect artifact and the drift event; a member with a handful of turns is reported
as such."""

import random
import time
import uuid
from datetime import UTC, datetime

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import tiny_config, tiny_show_rows, write_tiny_show

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_harness")]
MODEL = "watch-cast-bot"
CAST = ["Ada", "Bram", "Cleo"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny show as a cast (offline-tiny's chat-template layout), trained once; its profile as YAML."""
    from flows.train import train

    folder = tmp_path_factory.mktemp("watch-cast")
    config = tiny_config(write_tiny_show(folder / "show.csv"), show="The Tiny Show", **{
        "character": None, "cast": CAST, "offline_model.architecture": "llama", "offline_model.n_positions": 256,
        "dialogue.max_length": 160, "gate.max_perplexity": 1e9, "evaluation.replies": 6,
        "registry.model_name": MODEL})
    result = train(config)
    if not result["promoted"]:  # a tiny model may be refused for a member it makes worse: monitor it all the same
        MlflowClient().set_registered_model_alias(MODEL, "champion", result["version"])
    profile = folder / "watch-cast.yaml"
    profile.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True)))
    return profile, result["version"]


def log_turns(url: str, version: str, character: str, messages: list[str]) -> None:
    """Answered turns as `character`, written through the chat log's own API as the service does, from four keys."""
    from castbot.chatlog.store import ChatLog, TurnRecord

    log = ChatLog(url)
    for i, message in enumerate(messages):
        log.record(TurnRecord(
            turn_id=uuid.uuid4().hex, conversation_id=uuid.uuid4().hex, time=datetime.now(UTC),
            endpoint="chat", message=message, reply="The rocket needs fuel.", history_turns=0, model_name=MODEL,
            model_version=version, character=character, engine="continuous", prompt_tokens=20, new_tokens=5,
            latency_s=0.3, ttft_s=None, finish_reason="stop", client=f"key-{i % 4}"))


def events_of(name: str, since: datetime) -> list[dict]:
    """Events called `name` on this bot's resource that the Prefect server holds since `since`."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        response = client._client.post("/events/filter", json={
            "filter": {"event": {"name": [name]}, "occurred": {"since": since.isoformat()},
                       "resource": {"id": [f"castbot.bot.{MODEL}"]}}})
        response.raise_for_status()
        return response.json()["events"]


def test_the_registered_cast_version_carries_each_members_reference(trained):
    from tasks.release.trained_on import load_reference

    _, version = trained
    assert load_reference(MODEL)[0] == version
    members = load_reference(MODEL)[1]["cast"]
    assert list(members) == CAST
    for name in CAST:
        said = {row["line"] for row in tiny_show_rows() if row["speaker"] == name}
        assert members[name]["character"] == name and set(members[name]["character_lines"]) <= said


def test_one_member_sent_another_show_is_flagged_alone(trained, tmp_path, monkeypatch, capsys, shared_data):
    import pandas as pd
    from prefect.artifacts import Artifact
    from prefect.events.worker import EventsWorker

    from flows.monitor import main

    profile, version = trained
    url = f"sqlite:///{tmp_path / 'chatlog.db'}"
    monkeypatch.setenv("CASTBOT_CHATLOG_URL", url)
    asked_of_ada = [row["line"] for row in tiny_show_rows() if row["speaker"] != "Ada"]
    lotr = pd.read_csv(shared_data / "lotr" / "lotr_scripts.csv")["dialog"].dropna().astype(str).tolist()
    log_turns(url, version, "Ada", (asked_of_ada * 2)[:120])  # the show itself, as Ada heard it
    log_turns(url, version, "Bram", random.Random(0).sample(lotr, 150))  # another show, to Bram alone
    log_turns(url, version, "Cleo", asked_of_ada[:5])
    started = datetime.now(UTC)
    assert main([str(profile)]) == 0
    out = capsys.readouterr().out
    assert f"{MODEL} version {version}: 275 turns\ncast: Ada 120 turns, Bram 150 turns, Cleo 5 turns\n" in out, out
    assert "\nAda: drift: no (AUC" in out and "\nBram: drift: yes (AUC" in out, out
    assert "\nCleo: window: not enough data (5 turns < monitor.min_turns=100)\n" in out, out
    assert "Cleo: drift" not in out and "events: castbot.bot.drifted" in out, out

    [run] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("monitoring").experiment_id],
                                       filter_string=f"tags.`castbot.model_name` = '{MODEL}'")
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["castbot.cast"] == "Ada,Bram,Cleo" and "monitor.drift" not in tags
    assert (tags["monitor.drift_ada"], tags["monitor.drift_bram"], tags["monitor.window_cleo"]) == \
        ("no", "yes", "not enough data")
    assert metrics["drift_auc_bram"] > metrics["drift_threshold_bram"]
    assert metrics["drift_auc_ada"] <= metrics["drift_threshold_ada"]
    assert (metrics["turns"], metrics["turns_ada"], metrics["turns_bram"], metrics["turns_cleo"]) == (275, 120, 150, 5)
    assert "drift_auc" not in metrics and "drift_auc_cleo" not in metrics
    assert "monitor_history.png" in {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}

    report = Artifact.get("monitor-report").data
    assert f"### {MODEL} version {version}" in report
    assert "- **Ada**: 120 turns, no alarm" in report and "- **Bram**: 150 turns, **drift" in report, report
    assert "- **Cleo**: 5 turns, no alarm" in report and "#### Cleo" in report

    EventsWorker.drain_all()
    deadline = time.monotonic() + 60  # the server's event persister writes in batches (every 5 s by default)
    while not (events := events_of("castbot.bot.drifted", started)) and time.monotonic() < deadline:
        time.sleep(2)
    [event] = events
    assert event["payload"]["characters"] == ["Bram"] and event["payload"]["profile"] == "watch-cast"
    assert [line.split(":")[0] for line in event["payload"]["checks"]] == ["Bram"]
    assert event["payload"]["figures"]["drift_auc_bram"] > event["payload"]["figures"]["drift_threshold_bram"]
