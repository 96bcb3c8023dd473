"""The build's OpenVINO export: the servable model folder as OpenVINO IR for the CPU engine, its test perplexity
measured on the exported weights, and the card the engine reads (castbot/serve/engines/openvino.py serves it).

    card = export_for_cpu(folder, "auto", TestSplit(samples, max_length, perplexity), max_increase=0.01)
    ir = export_openvino(folder, "int8")       # cached per content in the state folder (benchmarks, tests)

optimum-intel 2.2 needs transformers < 5.6, so the exporter runs in a Python of its own (CASTBOT_OPENVINO_EXPORTER,
default .venv-openvino/bin/python in the working folder: `make cpu-engines` builds it).
"""

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from castbot.common.logs import run_logger
from castbot.common.settings import STATE_DIR
from castbot.model.dialogue import IGNORE_INDEX
from castbot.model.pretrained import sha256_file
from castbot.serve.engines import EngineError
from castbot.serve.engines.openvino import BUILT_CARD, BUILT_FOLDER, built_export, read_built_card

EXPORTER_ENV = "CASTBOT_OPENVINO_EXPORTER"


@dataclass
class TestSplit:
    """The held-out samples a build measures exported weights on, and the model's own perplexity on them."""

    samples: list[dict]
    max_length: int
    perplexity: float


def folder_digest(folder: Path) -> str:
    """sha256 over the folder's weight and config files: a new model version is a new export."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*")):
        if path.suffix in (".safetensors", ".json"):
            digest.update(f"{path.name} {sha256_file(path)}\n".encode())
    return digest.hexdigest()


def exporter() -> Path:
    """The Python that runs optimum-intel's exporter (CASTBOT_OPENVINO_EXPORTER, default .venv-openvino's)."""
    return Path(os.environ.get(EXPORTER_ENV, ".venv-openvino/bin/python")).absolute()


def export_openvino(folder: str | Path, weights: str, target: Path | None = None) -> Path:
    """The model folder as OpenVINO IR with its tokenizer (weights int8 or fp32), exported once per content into
    the state folder; with target, also placed there (hard links where the filesystem allows)."""
    folder = Path(folder)
    if weights not in ("int8", "fp32"):
        raise EngineError(f"OpenVINO weights {weights!r}: choose int8 or fp32")
    cached = STATE_DIR / "engines" / f"openvino-{weights}-{folder_digest(folder)[:16]}"
    if not (cached / ".complete").exists():
        python = exporter()
        if not python.exists():
            raise EngineError(f"no OpenVINO exporter at {python}: run `make cpu-engines` or set {EXPORTER_ENV} to "
                              "a Python with optimum-intel[openvino]")
        done = subprocess.run([str(python), "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model",
                               str(folder), "--task", "text-generation-with-past", "--weight-format", weights,
                               str(cached)], capture_output=True, text=True)
        if done.returncode:
            last = done.stderr.strip().splitlines()[-5:]
            raise EngineError(f"the OpenVINO export of {folder} failed: " + " / ".join(last))
        (cached / ".complete").touch()
    if target is None:
        return cached
    shutil.copytree(cached, target, copy_function=link_or_copy)
    return target


def link_or_copy(source: str, dest: str) -> None:
    try:
        os.link(source, dest)
    except OSError:  # another filesystem
        shutil.copy2(source, dest)


def check_export(folder: Path, tag: str, openvino: str | None) -> None:
    """An existing import serves as it is, unless a build asks for OpenVINO weights it does not hold."""
    held = read_built_card(folder)["weights"] if built_export(folder) else "none"
    if openvino in ("int8", "fp32") and held != openvino:
        raise EngineError(f"{tag} is already imported with OpenVINO weights {held}, not {openvino}: delete it "
                          f"(bentoml models delete {tag}) to import it again with {openvino}")


def export_for_cpu(folder: Path, mode: str, test: TestSplit | None, max_increase: float) -> dict | None:
    """The servable folder's OpenVINO IR for the CPU engine, in folder/openvino with a card of what was measured.
    mode as RegistryConfig.openvino: auto takes int8 weights when their test perplexity is within max_increase
    of the model's own, else fp32. None: no export (off, or auto without OpenVINO's exporter)."""
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
    from castbot.scores.quality import pooled_perplexity
    from tasks.evaluate.perplexity import encode_samples

    bot = Bot.load(str(folder), max_length=test.max_length, weights=False)  # tokenizer and format: no torch weights
    encoded = encode_samples(bot, test.samples, test.max_length)
    return pooled_perplexity(exported_losses(target, encoded))


def exported_losses(folder: Path, encoded: list[dict]) -> list[tuple[float, int]]:
    """(sum of token losses in nats, target tokens) per encoded sample, from the exported model's own logits (as
    castbot.model.bot.sample_losses does for torch): the served weights' perplexity. One sample at a time: the IR
    keeps its KV cache as state, reset before each."""
    import numpy as np
    import openvino
    from scipy.special import logsumexp

    request = openvino.Core().compile_model(str(Path(folder) / "openvino_model.xml"), "CPU").create_infer_request()
    results = []
    for row in encoded:
        ids = np.array([row["input_ids"]], dtype=np.int64)
        request.reset_state()
        logits = request.infer({"input_ids": ids, "attention_mask": np.array([row["attention_mask"]], dtype=np.int64),
                                "position_ids": np.arange(ids.shape[1])[None], "beam_idx": np.zeros(1, np.int32)},
                               share_outputs=True)["logits"][0, :-1].astype(np.float64)  # position t predicts t + 1
        labels = np.array(row["labels"][1:])
        target = labels != IGNORE_INDEX
        logits, labels = logits[target], labels[target]
        log_z = logsumexp(logits, axis=-1)  # (targets,)
        results.append((float((log_z - logits[np.arange(len(labels)), labels]).sum()), int(target.sum())))
    return results
