"""Fine-tuning on several processes (DDP on a GPU node): `training.processes > 1` runs every rank of
tasks.train.finetune.train_model under `accelerate launch` (see configs/accelerate/multi-gpu.yaml)."""

import json
import subprocess
import sys
from pathlib import Path

from castbot.config import TrainingConfig
from castbot.model.folder import ModelCard


def launch_distributed(base_model: str, datasets, config: TrainingConfig, output: Path, run_id: str,
                       card: ModelCard | None) -> dict:
    """Run train_model on config.processes ranks with `accelerate launch`; rank 0 writes the figures."""
    datasets.save_to_disk(str(output / "datasets"))
    spec = output / "launch.json"
    spec.write_text(json.dumps({"base_model": base_model, "config": config.model_dump(mode="json"),
                                "output_dir": str(output), "run_id": run_id, "card": card and card.model_dump(mode="json")}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(config.processes)]
    if config.accelerate_config:
        command += ["--config_file", config.accelerate_config]
    subprocess.run([*command, "-m", "tasks.train.distributed", str(spec)], check=True)
    return json.loads((output / "figures.json").read_text())


def broadcast(value):
    """Rank 0's value on every rank (one process: unchanged)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_main(spec_path: str) -> None:
    """Entry point of each `accelerate launch` rank."""
    import torch.distributed as dist
    from datasets import load_from_disk

    from tasks.train.finetune import train_model

    spec = json.loads(Path(spec_path).read_text())
    output = Path(spec["output_dir"])
    result = train_model(spec["base_model"], load_from_disk(str(output / "datasets")),
                         TrainingConfig.model_validate(spec["config"]), str(output), spec["run_id"],
                         ModelCard.model_validate(spec["card"]) if spec["card"] else None)
    if not dist.is_initialized() or dist.get_rank() == 0:
        (output / "figures.json").write_text(json.dumps(result))
    if dist.is_initialized():  # left to interpreter exit, gloo's threads can abort a rank (SIGABRT) after the work
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(sys.argv[1])
