"""The study flow end to end: tiny-model trials under a Prefect test server, a real SQLite MLflow and Optuna store."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import REPO, tiny_config, write_tiny_show

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_harness")]

# trial 0 runs the profile's own learning rate (0.005); trial 1 (enqueued) one 500x lower, which has barely moved
# from the initial loss at the first validation (step 6) and is pruned there, as the median pruner has trial 0's
# loss at step 6 to compare with (startup_trials 1); trial 2 is the sampler's.
TUNE = {"space": {"training.learning_rate": {"type": "float", "low": 1e-5, "high": 2e-2, "log": True},
                  "dialogue.context_turns": {"type": "int", "low": 1, "high": 3}},
        "enqueue": [{"training.learning_rate": 1e-5}], "trials": 3, "pruner": {"startup_trials": 1}}


def write_profile(folder: Path, name: str, tune: dict) -> Path:
    raw = tiny_config(write_tiny_show(folder / "show.csv"),
                      **{"registry.model_name": name}).model_dump(mode="json", exclude_unset=True)
    raw["data"]["path"] = "show.csv"  # relative to the profile, as in shipped profiles
    raw["tune"] = tune
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_a_study_prunes_a_bad_trial_nests_trials_in_mlflow_and_trains_the_winner(tmp_path):
    import optuna
    from prefect.client.orchestration import get_client

    from castbot.config.profile import load_profile
    from flows.tune import tune

    profile = write_profile(tmp_path, "tuned-bot", TUNE)
    result = tune(load_profile(profile), str(profile), train_winner=True)

    client = MlflowClient()
    study_run = client.get_run(result["study_run_id"])
    assert study_run.info.status == "FINISHED"
    trials = client.search_runs([study_run.info.experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{study_run.info.run_id}'",
                                order_by=["attributes.start_time ASC"])
    assert [r.info.run_name for r in trials] == ["trial-0", "trial-1", "trial-2"]
    states = {r.info.run_name: r.data.tags["castbot.trial_state"] for r in trials}
    assert states["trial-0"] == "COMPLETE" and states["trial-1"] == "PRUNED", states

    own, pruned = trials[0], trials[1]
    assert float(pruned.data.params["training.learning_rate"]) == 1e-5
    assert pruned.info.status == "KILLED"
    # stopped at once: nothing trained after the first validation (step 6 of 12)
    assert max(m.step for m in client.get_metric_history(pruned.info.run_id, "loss")) <= 6
    assert [m.step for m in client.get_metric_history(own.info.run_id, "eval_loss")] == [6, 12]
    assert own.data.metrics["best_eval_loss"] == min(
        m.value for m in client.get_metric_history(own.info.run_id, "eval_loss"))
    assert "loss_curve.png" in {a.path for a in client.list_artifacts(own.info.run_id)}

    # the study run holds the best settings, Optuna's plots and the table; so does the Prefect run
    best = min((r for r in trials if r.data.tags["castbot.trial_state"] == "COMPLETE"),
               key=lambda r: r.data.metrics["best_eval_loss"])
    assert result["best_value"] == pytest.approx(best.data.metrics["best_eval_loss"])
    assert study_run.data.tags["best.training.learning_rate"] == best.data.params["training.learning_rate"]
    artifacts = {a.path for a in client.list_artifacts(study_run.info.run_id)}
    assert {"optimization_history.png", "trials.md"} <= artifacts
    if sum(s == "COMPLETE" for s in states.values()) >= 2:
        assert "param_importances.png" in artifacts
    with get_client(sync_client=True) as prefect:
        table = prefect.read_latest_artifacts()  # newest per key
        [study_table] = [a for a in table if a.key == "study-trials"]
    assert "| 1 | PRUNED |" in study_table.data and "validation loss" in study_table.data

    from castbot.common.settings import STATE_DIR

    storage = optuna.load_study(study_name=result["study"], storage=f"sqlite:///{STATE_DIR / 'tune' / 'optuna.db'}")
    assert [t.state.name for t in storage.trials][:2] == ["COMPLETE", "PRUNED"]

    # the winner's profile sits beside the original, says why in comments, loads, and was trained by the train flow
    tuned = Path(result["profile"])
    assert tuned == tmp_path / "tuned-bot.tuned.yaml"
    text = tuned.read_text()
    assert text.startswith("# Written by python -m flows.tune") and "the test split was not read" in text
    winner = load_profile(tuned)
    assert winner.training.learning_rate == pytest.approx(result["best_params"]["training.learning_rate"], rel=1e-3)
    assert winner.dialogue.context_turns == result["best_params"]["dialogue.context_turns"]
    assert winner.data.path == str(tmp_path / "show.csv")
    trained = result["train"]
    assert trained["version"] == "1"
    train_run = client.get_run(trained["run_id"])
    assert float(train_run.data.params["training.learning_rate"]) == winner.training.learning_rate
    assert MlflowClient().get_model_version("tuned-bot", "1").run_id == trained["run_id"]


def test_cli_refuses_a_bad_search_space_naming_the_key(tmp_path):
    profile = write_profile(tmp_path, "bad-space-bot", {"space": {"training.lora.rank": {
        "type": "categorical", "choices": [8, 16]}}})
    result = subprocess.run([sys.executable, "-m", "flows.tune", str(profile), "--no-train"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "tune.space.training.lora.rank: 'training.lora.rank' is not a setting a study can vary" in result.stderr
