"""MLflow tracking and registry: the training run, the champion, registration and the alias."""

import os
import subprocess
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient
from prefect import task
from prefect.artifacts import create_markdown_artifact

from castbot.common.settings import artifact_root
from castbot.config.profile import TrainRunConfig

CHAMPION = "champion"


class ChampionMoved(RuntimeError):
    """Another run promoted a model while this one trained: this candidate was compared with an old champion."""


def git_commit() -> str:
    """HEAD of the project checkout, with '-dirty' when there are uncommitted changes; 'unknown' outside git."""
    root = Path(__file__).resolve().parents[2]  # the checkout: tasks/<stage>/<module>.py
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def shown_settings(config: TrainRunConfig) -> dict:
    """TrainRunConfig.run_settings with any password in a URL (user:***@host) or a connection string
    (password=***) masked: what MLflow may show, and what the digest (castbot.config_sha256) hashes."""
    from castbot.chatlog.settings import mask_settings

    return mask_settings(config.run_settings())


def flat_params(config: TrainRunConfig) -> dict[str, str]:
    """The training run's settings (shown_settings: what its digest covers, passwords masked) as dotted MLflow
    params."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            flat[prefix[:-1]] = str(value)[:500]

    walk("", shown_settings(config))
    return flat


def experiment_artifacts(experiment: str) -> str | None:
    """Beside the local registry; None with a tracking server, which stores them where --artifacts-destination says."""
    if mlflow.get_tracking_uri().startswith(("http://", "https://")):
        return None
    return f"{artifact_root()}/{experiment}"


def close_interrupted_runs(client: MlflowClient, experiment_id: str, work_key: str, successor: str) -> None:
    """Mark runs of the same work folder left RUNNING by a killed process as KILLED, pointing at the new run."""
    stale = client.search_runs([experiment_id], filter_string=f"tags.`castbot.work_key` = '{work_key}' "
                                                              "and attributes.status = 'RUNNING'")
    for run in stale:
        if run.info.run_id != successor:
            client.set_tag(run.info.run_id, "castbot.resumed_by", successor)
            client.set_terminated(run.info.run_id, "KILLED")


@task(name="start_run", retries=2, retry_delay_seconds=2)
def start_run(config: TrainRunConfig, data_sha256: str, work_key: str = "") -> str:
    """Create the MLflow run for this training, tagged with data, code and config; return its id. A run of the
    same work folder that a killed process left RUNNING is closed as KILLED, tagged with this run's id."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(config.registry.experiment)
    experiment_id = (
        experiment.experiment_id if experiment
        else client.create_experiment(config.registry.experiment,
                                      artifact_location=experiment_artifacts(config.registry.experiment))
    )
    settings = shown_settings(config)
    tags = {"castbot.data_sha256": data_sha256, "castbot.git_commit": git_commit(),
            "castbot.config_sha256": config.digest(), "castbot.base_model": settings["base_model"],
            "castbot.character": config.character or "", "castbot.work_key": work_key}
    run = client.create_run(experiment_id, tags=tags, run_name=f"{config.model_name}-train")
    close_interrupted_runs(client, experiment_id, work_key, run.info.run_id)
    for key, value in flat_params(config).items():
        client.log_param(run.info.run_id, key, value)
    client.log_text(run.info.run_id, yaml.safe_dump(settings, sort_keys=False), "config.yaml")
    return run.info.run_id


def hf_folder(downloaded: str) -> Path:
    """The save_pretrained folder inside a downloaded pyfunc model (MLmodel maps the artifact key to its path)."""
    from mlflow.models import Model

    from castbot.model.pyfunc import HF_ARTIFACT

    artifacts = Model.load(downloaded).flavors["python_function"]["artifacts"]
    return Path(downloaded) / artifacts[HF_ARTIFACT]["path"]


# "no such model" and "model has no such alias": every other registry error must stop the run,
# or a registry outage would look like "no champion yet" and promote anything under the limit
NO_CHAMPION_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


def champion_version(model_name: str) -> str | None:
    """The version the champion alias points at, or None when there is no champion yet."""
    try:
        return str(MlflowClient().get_model_version_by_alias(model_name, CHAMPION).version)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in NO_CHAMPION_CODES:
            return None
        raise


@task(name="tag_run", retries=2, retry_delay_seconds=2)
def tag_run(run_id: str, tags: dict[str, str]) -> None:
    """Set tags on the MLflow run."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


@task(name="finish_run", retries=2, retry_delay_seconds=2)
def finish_run(run_id: str, status: str) -> None:
    """Close the MLflow run as FINISHED or FAILED."""
    MlflowClient().set_terminated(run_id, status)


@task(name="download_champion", retries=2, retry_delay_seconds=2)
def download_champion(model_name: str, workdir: str) -> dict | None:
    """{"version", "path"} of the champion's save_pretrained folder, or None when there is no champion yet."""
    import shutil

    version = champion_version(model_name)
    if version is None:
        return None
    shutil.rmtree(workdir, ignore_errors=True)  # a retry or an earlier run's download starts afresh
    Path(workdir).mkdir(parents=True)
    folder = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}", dst_path=workdir)
    return {"version": version, "path": str(hf_folder(folder))}


@task(name="register_model")  # no retries: a retry after log_model would register a second version
def register_model(run_id: str, model_path: str, config: TrainRunConfig, tags: dict[str, str]) -> str:
    """Log the model to the run and register it as a new version of config.model_name (no alias)."""
    from castbot.model.folder import CARD_FILE, read_card
    from castbot.model.pyfunc import HF_ARTIFACT

    if read_card(model_path) is None:  # the service would prompt a card-less folder in the wrong format
        raise ValueError(f"{model_path}: no {CARD_FILE}; register a folder that training saved")

    client = MlflowClient()
    package = Path(__file__).resolve().parents[2] / "castbot"
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(package / "model" / "mlflow_model.py"),  # models-from-code: nothing pickled
            artifacts={HF_ARTIFACT: model_path},
            code_paths=[str(package)],
            pip_requirements=["torch", "transformers", "tokenizers", "mlflow", "safetensors", "peft"],
            registered_model_name=config.model_name,
        )
    version = str(info.registered_model_version)
    run = client.get_run(run_id)
    for key, value in {**{k: v for k, v in run.data.tags.items() if k.startswith("castbot.")}, **tags}.items():
        client.set_model_version_tag(config.model_name, version, key, value)
    create_markdown_artifact(mlflow_links(run.info.experiment_id, run_id, config.model_name, version),
                             key="mlflow-links", description="MLflow run and model version")
    return version


@task(name="promote_champion", retries=2, retry_delay_seconds=2)
def promote_champion(model_name: str, version: str, measured_champion: str | None, bento: str | None = None) -> None:
    """Point the champion alias at version, unless another run moved it since this run measured it: then
    ChampionMoved, and the caller deletes the Bento built for version (tasks.release.bento.withdraw_bento)."""
    current = champion_version(model_name)
    if current != measured_champion:
        raise ChampionMoved(f"{model_name}: the champion moved from version {measured_champion} to {current} while "
                           f"this run was training; version {version} was compared with the old one, so it is "
                           "not promoted" + (f" and its Bento {bento} was deleted" if bento else "") +
                           ". Rerun to compare it with the new champion.")
    MlflowClient().set_registered_model_alias(model_name, CHAMPION, version)


def mlflow_links(experiment_id: str, run_id: str, model_name: str, version: str) -> str:
    """Markdown links to the run and the model version in the MLflow UI (CASTBOT_MLFLOW_UI_URL)."""
    ui = os.environ.get("CASTBOT_MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")
    return (f"### MLflow\n\n- run: [{run_id}]({ui}/#/experiments/{experiment_id}/runs/{run_id})\n"
            f"- model: [{model_name} version {version}]({ui}/#/models/{model_name}/versions/{version})\n")
