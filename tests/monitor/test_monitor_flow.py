"""The loop's flows on a real MLflow registry and Prefect test server: a registered version carries its monitoring
reference, a scheduled run with nothing new skips training, and the monitor flow reads a real SQLite chat log,
prints its verdicts, records an MLflow run and emits the drift event."""

import random
import time
import uuid
from datetime import UTC, datetime

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import tiny_config, write_tiny_show

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_harness")]
MODEL = "watch-bot"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Ada bot trained and promoted once; its profile written as YAML for the CLIs."""
    from flows.train import train

    folder = tmp_path_factory.mktemp("watch")
    config = tiny_config(write_tiny_show(folder / "show.csv"), **{"registry.model_name": MODEL})
    result = train(config)
    assert result["promoted"], result["reason"]
    profile = folder / "watch.yaml"
    profile.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True)))
    return config, profile, result


def test_the_registered_version_carries_its_monitoring_reference(trained):
    from tasks.release.trained_on import load_reference

    config, _, result = trained
    version, reference = load_reference(MODEL)
    assert version == result["version"] == "1"
    assert reference["character"] == "Ada" and reference["contexts"] and reference["character_lines"]
    assert set(reference["character_lines"]) <= {row["line"] for row in _rows() if row["speaker"] == "Ada"}


def test_a_scheduled_run_with_nothing_new_skips_training(trained, tmp_path):
    from flows.train import train

    config, _, _ = trained
    result = train(config, skip_if_unchanged=True)
    assert result["skipped"].startswith("nothing new since champion version 1: same data")
    assert [str(v.version) for v in MlflowClient().search_model_versions(f"name='{MODEL}'")] == ["1"]
    # a changed setting is something new: that run trains (and registers version 2)
    changed = config.model_copy(update={"training": config.training.model_copy(update={"max_steps": 6})})
    assert "skipped" not in train(changed, skip_if_unchanged=True)


def test_the_monitor_cli_refuses_a_bot_without_champion(tmp_path, capsys):
    from flows.monitor import main

    data = write_tiny_show(tmp_path / "show.csv")
    profile = tmp_path / "nobody.yaml"
    profile.write_text(yaml.safe_dump(tiny_config(data, **{"registry.model_name": "nobody-bot"})
                                      .model_dump(mode="json", exclude_unset=True)))
    assert main([str(profile)]) == 1
    assert "nobody-bot has no champion version" in capsys.readouterr().err


def test_the_monitor_cli_refuses_a_missing_chat_log(trained, tmp_path, monkeypatch, capsys):
    from flows.monitor import main

    _, profile, _ = trained
    monkeypatch.setenv("CASTBOT_CHATLOG_URL", f"sqlite:///{tmp_path / 'absent.db'}")
    assert main([str(profile)]) == 1
    assert f"no chat log at {tmp_path / 'absent.db'}" in capsys.readouterr().err


def _rows():
    from tests.conftest import tiny_show_rows

    return tiny_show_rows()


def log_turns(url: str, messages: list[str], version: str = "1") -> None:
    """Write answered turns through the chat log's own API, as the service does, from four API keys in turn."""
    from castbot.chatlog.store import ChatLog, TurnRecord

    log = ChatLog(url)
    for i, message in enumerate(messages):
        log.record(TurnRecord(
            turn_id=uuid.uuid4().hex, conversation_id=uuid.uuid4().hex, time=datetime.now(UTC),
            endpoint="chat", message=message, reply="The rocket needs fuel.", history_turns=0, model_name=MODEL,
            model_version=version, character="Ada", engine="continuous", prompt_tokens=20, new_tokens=5,
            latency_s=0.3, ttft_s=None, finish_reason="stop", client=f"key-{i % 4}"))


def drift_events(since: datetime) -> list[dict]:
    """castbot.bot.drifted events the Prefect server holds since `since`."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        response = client._client.post("/events/filter", json={
            "filter": {"event": {"name": ["castbot.bot.drifted"]}, "occurred": {"since": since.isoformat()}}})
        response.raise_for_status()
        return response.json()["events"]


def test_the_monitor_flow_on_in_and_out_of_distribution_traffic(trained, tmp_path, monkeypatch, capsys,
                                                                  shared_data):
    import pandas as pd
    from prefect.events.worker import EventsWorker

    from flows.monitor import main

    _, profile, _ = trained
    url = f"sqlite:///{tmp_path / 'chatlog.db'}"
    monkeypatch.setenv("CASTBOT_CHATLOG_URL", url)
    others = [row["line"] for row in _rows() if row["speaker"] != "Ada"]
    log_turns(url, others[:8])
    assert main([str(profile)]) == 0
    assert "window: not enough data (8 turns < monitor.min_turns=100)" in capsys.readouterr().out

    log_turns(url, (others * 2)[8:120])  # 120 turns of the show itself
    started = datetime.now(UTC)
    assert main([str(profile)]) == 0
    out = capsys.readouterr().out
    assert "drift: no (AUC" in out and "errors: ok" in out, out

    lotr = pd.read_csv(shared_data / "lotr" / "lotr_scripts.csv")["dialog"].dropna().astype(str).tolist()
    log_turns(url, random.Random(0).sample(lotr, 200))  # another show's lines now dominate the window
    log_turns(url, ["ignored: answered by an older version"] * 3, version="0")
    assert main([str(profile)]) == 0
    out = capsys.readouterr().out
    assert "drift: yes (AUC" in out and "events: castbot.bot.drifted" in out and "3 of other versions" in out, out

    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("monitoring").experiment_id],
                                      filter_string=f"tags.`castbot.model_name` = '{MODEL}'",
                                      order_by=["attributes.start_time DESC"])
    assert [r.data.tags["monitor.drift"] for r in runs[:2]] == ["yes", "no"]
    assert runs[0].data.metrics["drift_auc"] > runs[0].data.metrics["drift_threshold"]
    assert "monitor_history.png" in {a.path for a in MlflowClient().list_artifacts(runs[0].info.run_id)}

    EventsWorker.drain_all()
    deadline = time.monotonic() + 60  # the server's event persister writes in batches (every 5 s by default)
    while not (events := drift_events(started)) and time.monotonic() < deadline:
        time.sleep(2)
    [event] = events
    assert event["resource"]["prefect.resource.id"] == f"castbot.bot.{MODEL}"
    assert event["payload"]["profile"] == "watch" and event["payload"]["figures"]["drift_auc"] > 0.5
