"""Prefect deployments for real on 127.0.0.1: server, work pools, `prefect deploy`, a process worker, runs.

One module-scoped Prefect server (its own PREFECT_HOME) and worker; about 1.5-3 minutes on 2 busy cores,
most of it the smoke profile's training run. The worker's flow-run processes inherit this session's
MLFLOW_TRACKING_URI and CASTBOT_HOME (tests/conftest.py), so the champion lands in the test's registry.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from deployments import render
from tests.conftest import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
FLOW = "train-character-bot"
K8S_TEMPLATE = REPO / "deployments" / "k8s" / "base" / "prefect-base-job-template.json"
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def stop(proc: subprocess.Popen, interrupts: int, grace: float) -> None:
    """SIGINT `interrupts` times (a Prefect worker needs two), then kill what is left of its process group."""
    for _ in range(interrupts):
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # flow-run children included; the group is the one we started
        proc.wait(timeout=10)


class Prefect:
    """A Prefect server and worker started by this test module, and a small REST client for them."""

    def __init__(self, home: Path):
        self.home, self.port = home, free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(home / "prefect"), "PREFECT_API_URL": self.url,
                    "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_LOGGING_LEVEL": "INFO",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_CLI_WRAP_LINES": "false"}
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self.procs: list[tuple[subprocess.Popen, int, float]] = []
        self.worker_log = home / "worker.log"

    def start(self, name: str, args: list[str], interrupts: int, grace: float) -> Path:
        log = self.home / f"{name}.log"
        proc = subprocess.Popen([PREFECT, *args], cwd=REPO, env=self.env, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((proc, interrupts, grace))
        return log

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run([PREFECT, "--no-prompt", *args], cwd=REPO, env=self.env, capture_output=True,
                                text=True, timeout=timeout)
        output = result.stdout[-3000:] + result.stderr[-3000:]
        assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{output}"
        return result

    def wait_healthy(self, log: Path, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        pytest.fail(f"Prefect server not healthy after {timeout:.0f} s:\n{tail(log)}")

    def deployment(self, name: str) -> dict:
        response = self.http.get(f"/deployments/name/{FLOW}/{name}")
        response.raise_for_status()
        return response.json()

    def run(self, deployment: dict, parameters: dict) -> httpx.Response:
        return self.http.post(f"/deployments/{deployment['id']}/create_flow_run", json={"parameters": parameters})

    def wait_final(self, run_id: str, timeout: float, log: Path) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.http.get(f"/flow_runs/{run_id}").json()
            if run["state"]["type"] in FINAL_STATES:
                return run
            time.sleep(2)
        pytest.fail(f"flow run {run_id} not finished after {timeout:.0f} s (state {run['state']['type']}):\n"
                    f"{tail(log)}")

    def stop_all(self) -> None:
        for proc, interrupts, grace in reversed(self.procs):  # worker before server
            stop(proc, interrupts, grace)
        self.http.close()


# the profiles the tests read (demo, rick-and-morty, smoke) and a cast: 14 deployments, not all 5 a profile (each
# profile adds ~7 s to `prefect deploy`)
DEPLOYED = ["demo-nightly", "demo-nightly-k8s", "demo-monitor", "demo-monitor-k8s", "demo-study", "smoke",
            "smoke-k8s", "smoke-monitor", "smoke-monitor-k8s", "smoke-study", "rick-and-morty-nightly",
            "rick-and-morty-nightly-k8s", "rick-and-morty-cast-nightly"]


@pytest.fixture(scope="module")
def prefect(tmp_path_factory):
    """Server up, both pools created, deployments/prefect.yaml's deployments of four profiles deployed (every
    profile renders alike: test_prefect_yaml_is_rendered_from_the_profiles), a local worker polling."""
    home = tmp_path_factory.mktemp("prefect-loopback")
    p = Prefect(home)
    try:
        server_log = p.start("server", ["server", "start", "--host", "127.0.0.1", "--port", str(p.port)],
                             interrupts=1, grace=20)
        p.wait_healthy(server_log)
        p.cli("work-pool", "create", render.LOCAL_POOL, "--type", "process")
        p.cli("work-pool", "create", render.K8S_POOL, "--type", "kubernetes", "--base-job-template", str(K8S_TEMPLATE))
        names = [arg for pattern in DEPLOYED for arg in ("--name", pattern)]
        p.cli("deploy", "--prefect-file", "deployments/prefect.yaml", *names, timeout=240)
        p.start("worker", ["worker", "start", "--pool", render.LOCAL_POOL, "--type", "process"],
                               interrupts=2, grace=15)
        yield p
    finally:
        p.stop_all()


def test_prefect_yaml_is_rendered_from_the_profiles():
    assert (REPO / "deployments" / "prefect.yaml").read_text() == render.render(), \
        "deployments/prefect.yaml is out of date with configs/: run python -m deployments.render"
    deployments = yaml.safe_load(render.render())["deployments"]
    profiles = [p.stem for p in render.deployed_profiles()]
    assert len(deployments) == 5 * len(profiles)  # train and monitor, each local and Kubernetes; the study
    crons = render.nightly_crons(profiles)
    assert crons["smoke"] is None and crons["demo"] == "0 2 * * *" and len(set(crons.values())) == len(profiles)
    demo = next(d for d in deployments if d["name"] == "demo-nightly")
    assert demo["schedules"] == [{"cron": crons["demo"], "timezone": render.TIMEZONE, "active": True}]
    assert demo["parameters"]["config"]["registry"]["model_name"] == "demo-bot"
    assert demo["parameters"]["skip_if_unchanged"] is True  # a scheduled run with nothing new ends at once
    [trigger] = demo["triggers"]
    assert trigger["match"] == {"prefect.resource.id": "castbot.bot.demo-bot"} and trigger["enabled"]
    assert trigger["expect"] == render.RETRAIN_EVENTS and trigger["parameters"] == {"skip_if_unchanged": False}
    monitor = next(d for d in deployments if d["name"] == "demo-monitor")
    assert monitor["entrypoint"] == render.MONITOR_ENTRYPOINT and monitor["parameters"]["profile"] == "demo"
    assert monitor["schedules"][0]["cron"] == render.MONITOR_CRON
    study = next(d for d in deployments if d["name"] == "demo-study")
    assert study["entrypoint"] == render.STUDY_ENTRYPOINT
    assert study["parameters"] == {"config": demo["parameters"]["config"]}
    assert study["schedules"] == [{"cron": "0 2 * * 6", "timezone": render.TIMEZONE, "active": False}]  # paused


def test_a_studys_tuned_profile_beside_its_own_gets_no_deployment(tmp_path):
    """flows.tune writes NAME.tuned.yaml into configs/: it must not become a second nightly run of the same bot."""
    for name in ("rick.yaml", "rick.tuned.yaml", "lotr.yaml"):
        (tmp_path / name).write_text("character: X\n")
    assert [p.name for p in render.deployed_profiles(tmp_path)] == ["lotr.yaml", "rick.yaml"]


def test_deploy_creates_scheduled_local_and_kubernetes_deployments(prefect):
    crons = render.nightly_crons([p.stem for p in render.deployed_profiles()])
    for profile in ("demo", "rick-and-morty"):
        local, k8s = prefect.deployment(f"{profile}-nightly"), prefect.deployment(f"{profile}-nightly-k8s")
        assert local["work_pool_name"] == render.LOCAL_POOL and k8s["work_pool_name"] == render.K8S_POOL
        [schedule] = local["schedules"]
        assert schedule["schedule"]["timezone"] == render.TIMEZONE and schedule["active"]
        assert schedule["schedule"]["cron"] == crons[profile]
        assert k8s["job_variables"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert k8s["job_variables"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert k8s["pull_steps"] == [{"prefect.deployments.steps.set_working_directory":
                                      {"directory": render.IMAGE_WORKDIR}}]
    study = prefect.http.get("/deployments/name/tune-character-bot/demo-study").json()
    [weekly] = study["schedules"]
    assert weekly["schedule"]["cron"] == "0 2 * * 6" and not weekly["active"]
    space = study["parameter_openapi_schema"]["definitions"]["SearchRange"]["properties"]
    assert space["low"]["description"] and study["parameter_openapi_schema"]["properties"]["trials"]
    # The UI's run form is drawn from this schema: every field has its description and bounds.
    schema = prefect.deployment("smoke")["parameter_openapi_schema"]
    batch_size = schema["definitions"]["TrainingConfig"]["properties"]["batch_size"]
    assert batch_size["minimum"] == 1 and batch_size["description"]


def test_out_of_bounds_parameter_is_refused_naming_the_field(prefect):
    smoke = prefect.deployment("smoke")
    config = {**smoke["parameters"]["config"], "training": {"batch_size": 0}}
    response = prefect.run(smoke, {"config": config})
    assert response.status_code == 409
    assert "config.training.batch_size" in response.text and "minimum of 1" in response.text


def test_cross_field_error_fails_the_run_before_any_task(prefect):
    smoke = prefect.deployment("smoke")
    config = {**smoke["parameters"]["config"], "offline_model": {"n_embd": 33, "n_head": 2}}
    response = prefect.run(smoke, {"config": config})
    response.raise_for_status()  # the JSON schema cannot say "multiple of n_head": pydantic says it in the run
    run = prefect.wait_final(response.json()["id"], timeout=240, log=prefect.worker_log)
    assert run["state"]["type"] == "FAILED"
    assert "n_embd (33) must be a multiple of n_head (2)" in run["state"]["message"]
    tasks = prefect.http.post("/task_runs/count", json={"flow_runs": {"id": {"any_": [run["id"]]}}}).json()
    assert tasks == 0


def test_triggered_run_trains_promotes_and_links_mlflow(prefect):
    from mlflow import MlflowClient

    smoke = prefect.deployment("smoke")
    response = prefect.run(smoke, smoke["parameters"])
    response.raise_for_status()
    run = prefect.wait_final(response.json()["id"], timeout=480, log=prefect.worker_log)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{tail(prefect.worker_log)}"

    version = MlflowClient().get_model_version_by_alias("smoke-bot", "champion")
    wanted = {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}
    artifacts = prefect.http.post("/artifacts/filter", json=wanted).json()
    by_key = {a["key"]: a["data"] for a in artifacts}
    assert "| candidate |" in by_key["gate-decision"] and "**promoted**" in by_key["gate-decision"]
    assert f"/runs/{version.run_id})" in by_key["mlflow-links"]
    assert f"/#/models/smoke-bot/versions/{version.version})" in by_key["mlflow-links"]


def emit(prefect: Prefect, event: str, model_name: str) -> None:
    """Send an event the way the monitor flow does (prefect.events.emit_event), from a process of its own."""
    code = ("from prefect.events import emit_event; from prefect.events.worker import EventsWorker; "
            f"emit_event(event={event!r}, resource={{'prefect.resource.id': 'castbot.bot.{model_name}'}}, "
            "payload={'profile': 'smoke'}); EventsWorker.drain_all()")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=prefect.env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def runs_of(prefect: Prefect, deployment: dict) -> list[dict]:
    wanted = {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}}
    response = prefect.http.post("/flow_runs/filter", json=wanted)
    response.raise_for_status()
    return response.json()


def test_a_drift_event_starts_the_training_deployment_once_per_window(prefect):
    """Last in this module: the run it starts trains smoke-bot again (skip_if_unchanged=false), after the
    promotion test above."""
    smoke = prefect.deployment("smoke")
    before = {r["id"] for r in runs_of(prefect, smoke)}
    emit(prefect, "castbot.bot.drifted", "smoke-bot")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (new := [r for r in runs_of(prefect, smoke) if r["id"] not in before]):
        time.sleep(2)
    assert new, f"no run of the smoke deployment 90 s after a castbot.bot.drifted event:\n{tail(prefect.worker_log)}"
    [run] = new
    assert run["parameters"]["skip_if_unchanged"] is False  # the event is the reason: train on the same inputs
    assert run["parameters"]["config"]["registry"]["model_name"] == "smoke-bot"
    # inside the window (render.RETRAIN_WITHIN_S) a second drift or degradation event starts nothing
    emit(prefect, "castbot.bot.degraded", "smoke-bot")
    emit(prefect, "castbot.bot.drifted", "other-bot")  # another bot's event is not this deployment's reason
    time.sleep(20)
    assert {r["id"] for r in runs_of(prefect, smoke)} - before == {run["id"]}
