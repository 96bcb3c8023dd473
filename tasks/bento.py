"""Serving build: a registered MLflow model version -> BentoML model store -> a Bento, tagged back on the version.

    python -m tasks.bento --model demo-bot                  # the champion (models:/demo-bot@champion)
    python -m tasks.bento --model demo-bot --version 3 --gpu
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from prefect import task

from tasks.registry import hf_folder

REPO = Path(__file__).resolve().parent.parent
BENTO_TAG_KEY = "castbot.bento"


def resolve_version(model_name: str, version: str | None, alias: str):
    """The MLflow ModelVersion: an explicit version number, else the one the alias points at."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if version is not None:
        return client.get_model_version(model_name, version)
    return client.get_model_version_by_alias(model_name, alias)


def bentoml_model_tag(model_name: str, version: str) -> str:
    """BentoML tag of an MLflow version: 'demo-bot', 3 -> 'demo-bot:v3' (BentoML names are lowercase)."""
    return f"{re.sub(r'[^a-z0-9._-]', '-', model_name.lower())}:v{version}"


def import_model(model_version) -> str:
    """Copy the version's save_pretrained folder into the BentoML store; reuse an import of the same MLflow run."""
    import bentoml
    import mlflow

    tag = bentoml_model_tag(model_version.name, model_version.version)
    try:
        existing = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        existing = None
    if existing is not None:
        if existing.info.labels.get("mlflow_run_id") == model_version.run_id:
            return tag
        bentoml.models.delete(tag)  # a registry that was reset reuses version numbers
    labels = {"mlflow_model": model_version.name, "mlflow_version": str(model_version.version),
              "mlflow_run_id": model_version.run_id or "",
              "character": model_version.tags.get("castbot.character", "")}
    with tempfile.TemporaryDirectory() as tmp:
        folder = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model_version.name}/{model_version.version}", dst_path=tmp)
        with bentoml.models.create(name=tag, labels=labels) as stored:
            save_servable(hf_folder(folder), Path(stored.path))
    return tag


def save_servable(source: Path, dest: Path) -> None:
    """A self-contained model folder for serving: a LoRA adapter is merged into its base here, once, so the
    Bento needs neither peft nor the base model at start."""
    if not (source / "adapter_config.json").is_file():
        shutil.copytree(source, dest, dirs_exist_ok=True)
        return
    from castbot.model_folder import save_merged

    save_merged(source, dest)


def bentoml_build(model_tag: str, labels: dict[str, str], gpu: bool = False) -> str:
    """Run `bentoml build` in the repository root for model_tag; return the Bento tag."""
    bentofile = "bentofile.gpu.yaml" if gpu else "bentofile.yaml"
    command = [str(Path(sys.executable).with_name("bentoml")), "build", "-f", bentofile, "-o", "tag",
               "--arg", f"model={model_tag}", *(f"--label={k}={v}" for k, v in labels.items()), str(REPO)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    tags = [line.split("__tag__:", 1)[1].strip() for line in done.stdout.splitlines() if "__tag__:" in line]
    if done.returncode or not tags:
        raise RuntimeError(f"bentoml build failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return tags[-1]


@task(name="build_bento", retries=1, retry_delay_seconds=2)
def build_bento(model_name: str, version: str | None = None, alias: str = "champion", gpu: bool = False) -> str:
    """Import a registered version (the alias's by default) into BentoML, build its Bento, tag the version with it."""
    from mlflow import MlflowClient

    model_version = resolve_version(model_name, version, alias)
    model_tag = import_model(model_version)
    labels = {"mlflow_model": model_version.name, "mlflow_version": str(model_version.version)}
    bento_tag = bentoml_build(model_tag, labels, gpu)
    MlflowClient().set_model_version_tag(model_version.name, model_version.version,
                                         BENTO_TAG_KEY + ("_gpu" if gpu else ""), bento_tag)
    return bento_tag


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.bento", description="Build a Bento for a registered model.")
    parser.add_argument("--model", required=True, help="Registered MLflow model name, e.g. demo-bot.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", help="Model version number.")
    which.add_argument("--alias", default="champion", help="Model alias (default: champion).")
    parser.add_argument("--gpu", action="store_true", help="Build the GPU variant (bentofile.gpu.yaml).")
    args = parser.parse_args(argv)

    from mlflow.exceptions import MlflowException

    from castbot.settings import use_project_state

    use_project_state()
    try:
        bento_tag = build_bento.fn(args.model, args.version, args.alias, args.gpu)
    except MlflowException as exc:
        print(f"castbot: model {args.model}: {exc.message}", file=sys.stderr)
        return 1
    print(f"built {bento_tag}; serve it with: bentoml serve {bento_tag} --host 127.0.0.1 --port 3000")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
