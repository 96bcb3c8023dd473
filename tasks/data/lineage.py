"""What data a training run saw: the per-run report folder, and the cleaned dataset + reports in MLflow."""

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from prefect import task

from castbot.common.settings import STATE_DIR
from castbot.config.profile import PipelineConfig


def report_dir() -> str:
    """A new folder for this run's data reports (cleaning report, Data Docs); earlier runs' are never touched."""
    from prefect.runtime import flow_run

    run = flow_run.get_id() or uuid.uuid4().hex[:12]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = STATE_DIR / "reports" / f"{stamp}-{run}"
    folder.mkdir(parents=True, exist_ok=False)
    return str(folder)


def dataset_digest(frame: pd.DataFrame) -> str:
    """Content hash of the cleaned transcript (values, order and columns), 16 hex digits."""
    import hashlib

    digest = hashlib.sha256(",".join(frame.columns).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).values.tobytes())
    return digest.hexdigest()[:16]


@task(name="log_data_lineage", retries=2, retry_delay_seconds=2)
def log_data_lineage(run_id: str, cleaned: pd.DataFrame, source: str, reports: str, splits: dict[str, list[dict]],
                     more: dict[str, tuple[str, pd.DataFrame]] | None = None) -> str:
    """Log the cleaned dataset (and those of data.also_train_on: name -> (source, cleaned)) as the run's training
    inputs with digests, the samples per split (and the liked turns of data.feedback, with their digest), and the
    data reports as artifacts."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag

    from tasks.data.feedback import feedback_digest, feedback_samples
    from tasks.data.ingest import source_uri

    def training_input(frame: pd.DataFrame, source: str, digest: str) -> DatasetInput:
        name = f"{Path(source.replace(':', '-')).stem}-cleaned"
        dataset = mlflow.data.from_pandas(frame, source=source_uri(source), name=name, digest=digest)
        return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])

    more = more or {}
    digest = dataset_digest(cleaned)
    more_digests = {name: dataset_digest(frame) for name, (_, frame) in more.items()}
    client = MlflowClient()
    client.log_inputs(run_id, datasets=[training_input(cleaned, source, digest),
                                        *(training_input(frame, path, more_digests[name])
                                          for name, (path, frame) in more.items())])
    # castbot.* run tags are copied onto the model version at registration: the version names the data it saw
    client.set_tag(run_id, "castbot.cleaned_data_digest", digest)
    for name, other_digest in more_digests.items():
        client.set_tag(run_id, f"castbot.also_train_on.{name}.cleaned_data_digest", other_digest)
    for split, samples in splits.items():
        client.log_param(run_id, f"samples.{split}", len(samples))
    liked = feedback_samples(splits["train"])  # data.feedback: liked turns from the conversation log
    client.log_param(run_id, "samples.train_feedback", len(liked))
    if liked:
        client.set_tag(run_id, "castbot.feedback_digest", feedback_digest(liked))
    client.log_artifacts(run_id, reports, artifact_path="data_reports")
    return digest


def publish_markdown(markdown: str, key: str, description: str) -> None:
    """A Prefect markdown artifact when running inside a flow; nothing when a task is called directly (tests)."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() or TaskRunContext.get():
        create_markdown_artifact(markdown, key=key, description=description)


def resume_data_key(frame: pd.DataFrame, profiles: dict[str, PipelineConfig],
                    others: dict[str, tuple[pd.DataFrame, pd.DataFrame]], train: list[dict]) -> str:
    """The data half of a work folder's key: the transcript's sha256, per also_train_on profile its file's
    sha256 and its settings, and the digest of the liked turns (data.feedback) in the training split, so a run
    resumes only onto the same data cleaned the same way."""
    from tasks.data.feedback import feedback_digest, feedback_samples

    liked = feedback_samples(train)
    extra = [others[name][0].attrs["sha256"] + profiles[name].digest() for name in others]
    return "".join([frame.attrs["sha256"], *extra, feedback_digest(liked) if liked else ""])
