"""Is there anything new to train on? The inputs of a run (data files, resolved config, code) as one key, compared
with the key stored on the champion (and on the latest version) before any data step runs."""

import hashlib
import json
import subprocess
from pathlib import Path

from prefect import task

from castbot.config.profile import PipelineConfig

INPUTS_TAG = "castbot.inputs_sha256"  # on the model version, set with its monitoring reference


def code_fingerprint() -> str:
    """HEAD plus a hash of the uncommitted changes to tracked files: an edited checkout is new code, even though
    its commit (castbot.git_commit, 'HEAD-dirty') reads the same as before the edit. 'unknown' outside git."""
    root = Path(__file__).resolve().parents[2]  # the checkout: tasks/<stage>/<module>.py
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + (f"+{hashlib.sha256(diff).hexdigest()[:16]}" if diff else "")


def training_inputs(config: PipelineConfig, profiles: dict[str, PipelineConfig] | None = None,
                    liked: list[dict] | None = None) -> dict[str, str]:
    """What a training run depends on: each transcript's sha256, the resolved config's digest, the code. profiles
    (data.also_train_on) and liked (data.feedback's turns) as the run read them; None reads them here."""
    from castbot.config.profile import also_train_on_profiles
    from tasks.data.ingest import file_sha256

    def sha256(path: str) -> str:
        try:
            return file_sha256(path)
        except OSError:  # the ingest step refuses a missing or unreadable file with its own message
            return "unreadable"

    inputs = {"data": sha256(config.data.path), "config": config.digest(), "code": code_fingerprint()}
    for name, profile in (also_train_on_profiles(config) if profiles is None else profiles).items():
        inputs[f"also_train_on.{name}"] = sha256(profile.data.path)
    if config.data.feedback.enabled:  # a newly liked turn is new data
        from tasks.data.feedback import feedback_digest, read_liked_samples

        inputs["feedback"] = feedback_digest(read_liked_samples(config) if liked is None else liked)
    return inputs


def inputs_key(inputs: dict[str, str]) -> str:
    """One sha256 of the inputs (order-independent)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def unchanged_since(versions: list[tuple[str, str, dict[str, str]]], key: str) -> str | None:
    """The message for the first (label, version, tags) whose stored inputs key equals key; None: train.
    A version without the tag (registered before it existed) never matches: better one run too many."""
    for label, version, tags in versions:
        if tags.get(INPUTS_TAG) == key:
            return (f"nothing new since {label} version {version}: same data (sha256), resolved config and code "
                    f"(inputs {key[:12]}); not training. Train anyway: python -m flows.train PROFILE.yaml "
                    "(without --skip-if-unchanged), or skip_if_unchanged=false (deployment parameter).")
    return None


@task(name="check_freshness", retries=2, retry_delay_seconds=2)
def check_freshness(model_name: str, key: str) -> str | None:
    """Compare the run's inputs key with the champion's, then the latest version's (a refused candidate on the
    same inputs would be refused again); the skip message, or None when something is new."""
    import mlflow
    from mlflow import MlflowClient

    from tasks.release.registry import champion_version

    client = MlflowClient()
    candidates = []
    champion = champion_version(model_name)
    if champion is not None:
        candidates.append(("champion", champion, client.get_model_version(model_name, champion).tags))
    try:
        latest = client.search_model_versions(f"name='{model_name}'", order_by=["version_number DESC"],
                                              max_results=1)
    except mlflow.exceptions.MlflowException:
        latest = []
    if latest and str(latest[0].version) != champion:
        candidates.append(("latest", str(latest[0].version), latest[0].tags))
    return unchanged_since(candidates, key)
