"""One rank of a fine-tune on several processes (DDP on a GPU node): `training.processes > 1` makes the fine_tune
task (tasks.train.finetune.launch_distributed) start every rank as

    accelerate launch --num_processes N -m tasks.train.distributed OUTPUT/launch.json

(see configs/accelerate/multi-gpu.yaml). Each rank runs tasks.train.finetune.train_model; rank 0 writes the figures.
"""

import json
import sys
from pathlib import Path

from castbot.config.training import TrainingConfig
from castbot.model.folder import ModelCard
from tasks.train.finetune import train_model


def rank_main(spec_path: str) -> None:
    """Entry point of each `accelerate launch` rank: train from the spec launch_distributed wrote."""
    import torch.distributed as dist
    from datasets import load_from_disk

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
