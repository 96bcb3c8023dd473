"""A study killed mid-trial (SIGKILL) and run again: it reaches the requested trials and leaves none running."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, kill_9_once, tiny_config, write_tiny_show

pytestmark = pytest.mark.slow

TRIALS = 3


def run_study(profile: Path, env: dict) -> subprocess.Popen:
    # its own session: the kill below reaches the study process and nothing of ours
    return subprocess.Popen([sys.executable, "-m", "flows.tune", str(profile), "--no-train"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def trials(storage: str):
    import optuna

    [name] = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage).trials


def trial_reported(database: Path, number: int) -> bool:
    """Trial `number` is RUNNING and has reported a validation loss. Read with sqlite3, not Optuna: an Optuna
    storage opened while the study process creates its tables would race it to create them."""
    import sqlite3

    if not database.exists():
        return False
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        try:
            return bool(db.execute("SELECT 1 FROM trials t JOIN trial_intermediate_values v ON v.trial_id = "
                                   "t.trial_id WHERE t.number = ? AND t.state = 'RUNNING'", (number,)).fetchall())
        except sqlite3.OperationalError:  # tables not created yet
            return False


def trial_checkpointed(state: Path, number: int) -> bool:
    from tasks.train.checkpoints import checkpoint_problem

    return any(checkpoint_problem(c) is None for c in state.glob(f"tune/*/trial-{number}/**/checkpoint-*"))


def test_a_study_killed_mid_trial_resumes_to_the_requested_trials_with_none_left_running(tmp_path, prefect_harness):
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL

    state = tmp_path / "state"
    config = tiny_config(write_tiny_show(tmp_path / "show.csv"), **{
        "training.max_steps": 60, "training.eval_steps": 6, "training.save_steps": 6,
        "training.early_stopping_patience": 0, "registry.model_name": "resumed-study-bot"})
    raw = config.model_dump(mode="json", exclude_unset=True)
    raw["tune"] = {"space": {"training.learning_rate": {"type": "float", "low": 1e-3, "high": 2e-2, "log": True}},
                   "trials": TRIALS, "heartbeat_seconds": 1, "pruner": {"kind": "none"}}
    profile = tmp_path / "study.yaml"
    profile.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "CASTBOT_HOME": str(state), "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
           "PREFECT_API_URL": PREFECT_API_URL.value()}
    storage = f"sqlite:///{state / 'tune' / 'optuna.db'}"

    first = run_study(profile, env)
    # mid-trial: the second trial is running, has reported a validation loss and has saved the checkpoint that
    # follows it (the report comes first, so a kill right after it could find nothing to resume from)
    kill_9_once(first, lambda: trial_reported(state / "tune" / "optuna.db", 1) and trial_checkpointed(state, 1),
                "a validation loss and a checkpoint of trial 1")
    assert [t.state.name for t in trials(storage)][:2] == ["COMPLETE", "RUNNING"]  # left as the kill found it

    second = run_study(profile, env)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    assert f"{TRIALS} trials; best trial" in out

    done = trials(storage)
    assert not [t for t in done if t.state.name in ("RUNNING", "WAITING")], [t.state.name for t in done]
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in done) == TRIALS
    assert done[1].state.name == "FAIL"
    [retry] = [t for t in done if t.system_attrs.get("failed_trial") == 1]
    assert retry.state.name == "COMPLETE" and retry.params == done[1].params  # the killed trial, run again

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("castbot-tune").experiment_id
    [study_run] = client.search_runs([experiment], filter_string="tags.`castbot.role` = 'study'")
    assert study_run.info.status == "FINISHED"  # one study run across both processes
    runs = {r.info.run_name: r for r in client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{study_run.info.run_id}'")}
    assert runs["trial-1"].info.status == "KILLED" and runs["trial-1"].data.tags["castbot.trial_state"] == "FAIL"
    assert runs[f"trial-{retry.number}"].data.tags["castbot.retry_of"] == "1"
    # the retry resumed from the killed trial's checkpoints: its loss curve does not start at step 1
    losses = client.get_metric_history(runs[f"trial-{retry.number}"].info.run_id, "loss")
    assert min(m.step for m in losses) > 1
    assert not any(r.info.status == "RUNNING" for r in runs.values())
