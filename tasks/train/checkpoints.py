"""Where a training run keeps its checkpoints, and which of them a rerun can resume from."""

import hashlib
import json
import struct
import time
import zipfile
from pathlib import Path

from castbot.common.logs import run_logger

CHECKPOINTS = "checkpoints"  # Trainer's output_dir inside a run's work folder


def work_folder(data_sha256: str, config_digest: str) -> Path:
    """Same data + config -> same folder, so an interrupted run resumes from its checkpoints."""
    from castbot.common.settings import STATE_DIR

    return STATE_DIR / "runs" / hashlib.sha256(f"{data_sha256}{config_digest}".encode()).hexdigest()[:16]


def clear_work_folder(folder: Path) -> None:
    """A finished run's checkpoints and downloaded champion go: a rerun of the same data and config trains afresh."""
    import shutil

    for name in (CHECKPOINTS, "champion"):
        shutil.rmtree(Path(folder) / name, ignore_errors=True)


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unusable (missing, truncated, bad header), or None."""
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, ValueError) as exc:
        return f"{path.name} unreadable ({exc.__class__.__name__})"
    data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size != 8 + header_len + data_end:  # bytes: length prefix + header + tensors
        return f"{path.name} is truncated"
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when it is complete.

    Trainer writes weights, then optimizer/scheduler/RNG, then trainer_state.json last; a kill mid-save
    leaves a folder without trainer_state.json, a disk-full or copy error leaves truncated files.
    """
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        int(state["global_step"])
    except FileNotFoundError:
        return "no trainer_state.json (the save was cut short)"
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is unreadable"
    weights = [p for p in (checkpoint / "model.safetensors", checkpoint / "adapter_model.safetensors") if p.exists()]
    weights += sorted(checkpoint.glob("model-*-of-*.safetensors"))  # sharded large models
    if not weights:
        return "no model weights"
    for file in weights:
        if problem := _safetensors_problem(file):
            return problem
    for name in ("optimizer.pt", "scheduler.pt"):
        try:
            zipfile.ZipFile(checkpoint / name).close()  # torch.save writes a zip; a cut file has no directory
        except FileNotFoundError:
            return f"no {name}"
        except (OSError, zipfile.BadZipFile):
            return f"{name} is corrupt"
    return None


def latest_checkpoint(output_dir: Path) -> str | None:
    """The newest complete checkpoint, else None; unusable ones are renamed skipped-* with a warning."""
    log = run_logger("castbot.finetune")
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for checkpoint in checkpoints:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return str(checkpoint)
        # out of the checkpoint-* namespace, so Trainer's rotation and a later save never mix with it
        aside = checkpoint.with_name(f"skipped-{checkpoint.name}-{int(time.time())}")
        checkpoint.rename(aside)
        log.warning("skipping checkpoint %s: %s (moved to %s)", checkpoint.name, problem, aside.name)
    return None


def resumed_step(checkpoint: str | None) -> int:
    """The optimiser step a checkpoint was saved at (0 for a fresh start)."""
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]) if checkpoint else 0
