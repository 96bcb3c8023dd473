"""Serving build: a registered MLflow model version -> BentoML model store -> a Bento, tagged back on the version.

    python -m tasks.release.bento --model demo-bot                  # the champion (models:/demo-bot@champion)
    python -m tasks.release.bento --model demo-bot --version 3 --gpu
    python -m tasks.release.bento --model demo-bot --openvino int8    # the CPU engine's weights (default auto: fp32 here)
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from castbot.common.logs import run_logger
from tasks.release.registry import hf_folder

REPO = Path(__file__).resolve().parent.parent
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


@dataclass
class TestSplit:
    """The held-out samples a build measures exported weights on, and the model's own perplexity on them."""

    samples: list[dict]
    max_length: int
    perplexity: float


def import_model(model_version, openvino: str | None = None, test: TestSplit | None = None,
                 max_increase: float = 0.01) -> str:
    """Copy the version's save_pretrained folder into the BentoML store, with its OpenVINO export (export_for_cpu);
    reuse an import of the same MLflow run (never changed: Bentos built on it keep working)."""
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
    with tempfile.TemporaryDirectory() as tmp:
        folder = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model_version.name}/{model_version.version}", dst_path=tmp)
        with bentoml.models.create(name=tag, labels=labels) as stored:
            save_servable(hf_folder(folder), Path(stored.path))
            card = export_for_cpu(Path(stored.path), openvino or "off", test, max_increase)
    if card:
        from mlflow import MlflowClient

        MlflowClient().set_model_version_tag(model_version.name, model_version.version, OPENVINO_TAG_KEY,
                                             f"{card['weights']}: {card['reason']}")
    return tag


def check_export(folder: Path, tag: str, openvino: str | None) -> None:
    """An existing import serves as it is, unless a build asks for OpenVINO weights it does not hold."""
    from castbot.serve.engines import EngineError
    from castbot.serve.engines.openvino import built_export, read_built_card

    held = read_built_card(folder)["weights"] if built_export(folder) else "none"
    if openvino in ("int8", "fp32") and held != openvino:
        raise EngineError(f"{tag} is already imported with OpenVINO weights {held}, not {openvino}: delete it "
                          f"(bentoml models delete {tag}) to import it again with {openvino}")


def save_servable(source: Path, dest: Path) -> None:
    """A self-contained model folder for serving: a LoRA adapter is merged into its base here, once, so the
    Bento needs neither peft nor the base model at start."""
    if not (source / "adapter_config.json").is_file():
        shutil.copytree(source, dest, dirs_exist_ok=True)
        return
    from castbot.model.folder import save_merged

    save_merged(source, dest)


def export_for_cpu(folder: Path, mode: str, test: TestSplit | None, max_increase: float) -> dict | None:
    """The servable folder's OpenVINO IR for the CPU engine, in folder/openvino with a card of what was measured.
    mode as RegistryConfig.openvino: auto takes int8 weights when their test perplexity is within max_increase
    of the model's own, else fp32. None: no export (off, or auto without OpenVINO's exporter)."""
    from castbot.serve.engines.openvino import BUILT_CARD, BUILT_FOLDER, export_openvino, exporter

    folder = Path(folder)
    if mode == "off" or mode == "auto" and not exporter().exists():
        if mode == "auto":
            run_logger("castbot.bento").warning("no OpenVINO exporter at %s (make cpu-engines): the Bento has no "
                                                "OpenVINO model and serves with the continuous engine", exporter())
        return None
    target = folder / BUILT_FOLDER
    weights = "fp32" if mode == "fp32" or mode == "auto" and test is None else "int8"
    export_openvino(folder, weights, target)
    card = {"weights": weights, "setting": mode, "reason": "not measured (the build was given no test split)"}
    if test is not None:
        measured = exported_perplexity(target, folder, test)
        card.update({"reference_perplexity": test.perplexity, "test_samples": len(test.samples),
                     f"{weights}_test_perplexity": measured,
                     "reason": f"test perplexity {measured:.3f} against the model's {test.perplexity:.3f}"})
        rise = measured / test.perplexity - 1
        if mode == "auto" and rise > max_increase:  # quantised weights cost too much: serve fp32
            shutil.rmtree(target)
            export_openvino(folder, "fp32", target)
            fp32 = exported_perplexity(target, folder, test)
            card.update({"weights": "fp32", "fp32_test_perplexity": fp32,
                         "reason": f"test perplexity {fp32:.3f} against the model's {test.perplexity:.3f}; int8 "
                                   f"{measured:.3f} ({rise:+.2%}) exceeds the {max_increase:.1%} limit"})
    (target / BUILT_CARD).write_text(json.dumps(card, indent=2))
    run_logger("castbot.bento").info("OpenVINO export for CPU serving: %s weights, %s", card["weights"],
                                     card["reason"])
    return card


def exported_perplexity(target: Path, folder: Path, test: TestSplit) -> float:
    """Test perplexity of the exported IR, on the samples encoded by the model folder's own tokenizer and format."""
    from castbot.model.bot import Bot
    from castbot.serve.engines.openvino import exported_losses
    from tasks.evaluate.perplexity import encode_samples
    from castbot.scores.quality import pooled_perplexity

    bot = Bot.load(str(folder), max_length=test.max_length, weights=False)  # tokenizer and format: no torch weights
    encoded = encode_samples(bot, test.samples, test.max_length)
    return pooled_perplexity(exported_losses(target, encoded))


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
                openvino: str = "auto", test: TestSplit | None = None, max_increase: float = 0.01) -> str:
    """Import a registered version (the alias's by default) into BentoML with its OpenVINO export (export_for_cpu),
    build its Bento, tag the version with it."""
    from mlflow import MlflowClient

    model_version = resolve_version(model_name, version, alias)
    model_tag = import_model(model_version, None if gpu else openvino, test, max_increase)  # GPU: continuous
    labels = {"mlflow_model": model_version.name, "mlflow_version": str(model_version.version)}
    bento_tag = bentoml_build(model_tag, labels, gpu)
    MlflowClient().set_model_version_tag(model_version.name, model_version.version,
                                         BENTO_TAG_KEY + ("_gpu" if gpu else ""), bento_tag)
    return bento_tag


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.release.bento", description="Build a Bento for a registered model.")
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

    from castbot.serve.engines import EngineError
    from castbot.common.settings import use_project_state

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
