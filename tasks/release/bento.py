"""Serving build: a registered MLflow model version -> BentoML model store -> a Bento, tagged back on the version.

    python -m tasks.release.bento --model demo-bot                  # the champion (models:/demo-bot@champion)
    python -m tasks.release.bento --model demo-bot --version 3 --gpu
    python -m tasks.release.bento --model demo-bot --openvino int8    # the CPU engine's weights (auto: fp32 here)
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.release.openvino_export import TestSplit, check_export, export_for_cpu
from tasks.release.registry import hf_folder

REPO = Path(__file__).resolve().parents[2]
BENTO_TAG_KEY = "castbot.bento"
OPENVINO_TAG_KEY = "castbot.openvino"  # the weights the Bento's OpenVINO engine serves, and why


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


def import_model(model_version, openvino: str | None = None, test: TestSplit | None = None,
                 max_increase: float = 0.01, folder: str | None = None) -> str:
    """Copy the version's save_pretrained folder into the BentoML store, with its OpenVINO export (export_for_cpu);
    reuse an import of the same MLflow run (never changed: Bentos built on it keep working). folder: the version's
    model folder where the caller has it on disk (the training flow); else it is downloaded from MLflow."""
    import bentoml
    import mlflow

    tag = bentoml_model_tag(model_version.name, model_version.version)
    try:
        existing = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        existing = None
    if existing is not None:
        if existing.info.labels.get("mlflow_run_id") == model_version.run_id:
            check_export(Path(existing.path), tag, openvino)
            return tag
        bentoml.models.delete(tag)  # a registry that was reset reuses version numbers
    labels = {"mlflow_model": model_version.name, "mlflow_version": str(model_version.version),
              "mlflow_run_id": model_version.run_id or "",
              "character": model_version.tags.get("castbot.character", "")}
    if cast := model_version.tags.get("castbot.cast"):  # a cast model: its members, comma-joined, first = character
        labels["cast"] = cast
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(folder) if folder else hf_folder(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model_version.name}/{model_version.version}", dst_path=tmp))
        with bentoml.models.create(name=tag, labels=labels) as stored:
            save_servable(source, Path(stored.path))
            card = export_for_cpu(Path(stored.path), openvino or "off", test, max_increase)
    if card:
        from mlflow import MlflowClient

        MlflowClient().set_model_version_tag(model_version.name, model_version.version, OPENVINO_TAG_KEY,
                                             f"{card['weights']}: {card['reason']}")
    return tag


def save_servable(source: Path, dest: Path) -> None:
    """A self-contained model folder for serving: a LoRA adapter is merged into its base here, once, so the
    Bento needs neither peft nor the base model at start."""
    if not (source / "adapter_config.json").is_file():
        shutil.copytree(source, dest, dirs_exist_ok=True)
        return
    from castbot.model.folder import save_merged

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


@task(name="build_bento", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def build_bento(model_name: str, version: str | None = None, alias: str = "champion", gpu: bool = False,
                openvino: str = "auto", test: TestSplit | None = None, max_increase: float = 0.01,
                folder: str | None = None) -> str:
    """Import a registered version (the alias's by default) into BentoML with its OpenVINO export (export_for_cpu),
    build its Bento, tag the version with it. folder: the version's model folder, where the caller has it on disk."""
    from mlflow import MlflowClient

    model_version = resolve_version(model_name, version, alias)
    model_tag = import_model(model_version, None if gpu else openvino, test, max_increase, folder)  # GPU: continuous
    labels = {"mlflow_model": model_version.name, "mlflow_version": str(model_version.version)}
    bento_tag = bentoml_build(model_tag, labels, gpu)
    MlflowClient().set_model_version_tag(model_version.name, model_version.version,
                                         BENTO_TAG_KEY + ("_gpu" if gpu else ""), bento_tag)
    return bento_tag


@task(name="withdraw_bento", retries=2, retry_delay_seconds=2)
def withdraw_bento(model_name: str, version: str, tag: str) -> None:
    """Delete the Bento built for a version that was not promoted after all (the champion moved), the model
    imported for it, and the version's castbot.bento tag: `castbot-chat:latest` stays the champion's."""
    import bentoml
    from mlflow import MlflowClient

    try:
        models = [str(m.tag) for m in bentoml.get(tag).info.all_models]
        bentoml.delete(tag)
    except bentoml.exceptions.NotFound:  # a retry finds them gone already
        models = []
    for model in models:
        try:
            bentoml.models.delete(model)
        except bentoml.exceptions.BentoMLException:  # still used by another Bento
            pass
    MlflowClient().delete_model_version_tag(model_name, version, BENTO_TAG_KEY)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.release.bento",
                                     description="Build a Bento for a registered model.")
    parser.add_argument("--model", required=True, help="Registered MLflow model name, e.g. demo-bot.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", help="Model version number.")
    which.add_argument("--alias", default="champion", help="Model alias (default: champion).")
    parser.add_argument("--gpu", action="store_true", help="Build the GPU variant (bentofile.gpu.yaml).")
    parser.add_argument("--openvino", choices=["auto", "int8", "fp32", "off"], default="auto",
                        help="OpenVINO export for the CPU engine (registry.openvino); with no test split here, auto "
                        "exports fp32 (the training flow measures int8 on the test split).")
    args = parser.parse_args(argv)

    from mlflow.exceptions import MlflowException

    from castbot.common.settings import use_project_state
    from castbot.serve.engines import EngineError

    use_project_state()
    try:
        bento_tag = build_bento.fn(args.model, args.version, args.alias, args.gpu, args.openvino)
    except MlflowException as exc:
        print(f"castbot: model {args.model}: {exc.message}", file=sys.stderr)
        return 1
    except EngineError as exc:
        print(f"castbot: the Bento was not built: {exc}", file=sys.stderr)
        return 1
    print(f"built {bento_tag}; serve it with: bentoml serve {bento_tag} --host 127.0.0.1 --port 3000")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
