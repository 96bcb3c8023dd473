"""Interrupting a real training run: SIGKILL mid-training, rerun, and it resumes from the last checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.train.checkpoints import checkpoint_problem
from tests.conftest import REPO, kill_9_once, tiny_config, write_tiny_show

pytestmark = pytest.mark.slow

MAX_STEPS, EVERY = 60, 10


def run_flow(profile: Path, env: dict) -> subprocess.Popen:
    # its own session: the kill below reaches the flow process and nothing of ours
    return subprocess.Popen([sys.executable, "-m", "flows.train", str(profile)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def complete_steps(state: Path) -> list[int]:
    return sorted(int(c.name.split("-")[-1]) for c in state.glob("runs/*/checkpoints/checkpoint-*")
                  if checkpoint_problem(c) is None)


def test_a_killed_run_resumes_from_its_last_checkpoint_and_only_the_finished_run_is_promoted(
        tmp_path, prefect_harness):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from prefect.settings import PREFECT_API_URL

    state = tmp_path / "state"
    config = tiny_config(write_tiny_show(tmp_path / "show.csv"), **{
        "training.max_steps": MAX_STEPS, "training.eval_steps": EVERY, "training.save_steps": EVERY,
        "training.early_stopping_patience": 0, "registry.model_name": "resume-bot"})
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "CASTBOT_HOME": str(state), "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
           "PREFECT_API_URL": PREFECT_API_URL.value()}
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])

    first = run_flow(profile, env)
    kill_9_once(first, lambda: complete_steps(state), "first checkpoint")
    saved = complete_steps(state)[-1]
    assert saved < MAX_STEPS, "the kill came after training had finished"
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("resume-bot", "champion")  # an unfinished run never promotes

    second = run_flow(profile, env)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    assert "resume-bot version 1: promoted to champion" in out

    run, killed = client.search_runs(client.get_experiment_by_name("castbot").experiment_id,
                                     order_by=["attribute.start_time DESC"])
    assert killed.info.status == "KILLED" and killed.data.tags["castbot.resumed_by"] == run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train_resumed_from_step"] == saved  # lost at most one checkpoint interval
    assert run.data.metrics["train_global_step"] == MAX_STEPS
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert losses and min(m.step for m in losses) > saved, "the resumed run does not redo finished steps"
    assert 0 <= run.data.metrics["train_padding_fraction"] < 0.5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "samples.md"} <= artifacts
    workdir = next(state.glob("runs/*"))
    final_state = json.loads((workdir / "model" / "trainer_state.json").read_text())
    assert final_state["global_step"] == MAX_STEPS
    assert not (workdir / "checkpoints").exists(), "a finished run clears its checkpoints"
    assert str(client.get_model_version_by_alias("resume-bot", "champion").version) == "1"
