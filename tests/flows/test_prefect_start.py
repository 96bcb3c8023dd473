"""`python -m flows.train` on a busy machine: Prefect's temporary server gets time to start, or the user is told
which setting to raise."""

import multiprocessing
import os
import subprocess
import sys
import threading

import pytest
import yaml

from tests.conftest import REPO, tiny_config, write_tiny_show

pytestmark = pytest.mark.slow


def busy_loop() -> None:
    while True:
        pass


def run_train(tmp_path, **env_overrides: str) -> subprocess.CompletedProcess:
    """`python -m flows.train` on a tiny profile with a fresh PREFECT_HOME and castbot state, no PREFECT_API_URL."""
    config = tiny_config(write_tiny_show(tmp_path / "show.csv"), **{"registry.model_name": "busy-bot"})
    profile = tmp_path / "busy.yaml"
    profile.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL" and not k.startswith("PREFECT_SERVER_EPH")}
    env.update({"CASTBOT_HOME": str(tmp_path / "state"), "PREFECT_HOME": str(tmp_path / "prefect"),
                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "BENTOML_HOME": str(tmp_path / "bentoml"), **env_overrides})
    return subprocess.run([sys.executable, "-m", "flows.train", str(profile)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def stop_hogs(hogs: list) -> None:
    for hog in hogs:
        hog.kill()
        hog.join()


def test_flow_completes_while_the_cpu_is_saturated(tmp_path):
    """Two busy loops (one per core here) beside a first run (new Prefect database): the flow still trains and
    registers. The loops last the first 60 s, the server's start-up (over Prefect's 20 s default under this load)."""
    hogs = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(2)]
    for hog in hogs:
        hog.start()
    timer = threading.Timer(60, stop_hogs, args=(hogs,))
    timer.start()
    try:
        result = run_train(tmp_path)
    finally:
        timer.cancel()
        stop_hogs(hogs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "busy-bot version 1:" in result.stdout


def test_a_server_that_does_not_start_in_time_names_the_setting(tmp_path):
    """A timeout of 0 s cannot be met: exit 1 with the setting and PREFECT_API_URL named, no traceback."""
    result = run_train(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher" in result.stderr
    assert "PREFECT_API_URL" in result.stderr
    assert "Traceback" not in result.stderr
