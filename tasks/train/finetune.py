"""Fine-tune a causal LM on tokenised dialogues with transformers' Trainer: the fine_tune task and its body.

Full fine-tuning or LoRA (saved as adapters), bf16/fp16 autocast where the device has it, length-grouped
batches (padding is measured and reported), and checkpoints that a rerun resumes from. The pieces live apart:
tasks/train/checkpoints.py (work folder, resume), tasks/train/batches.py (length buckets), tasks/train/trainer.py
(Trainer subclass, callbacks, arguments), castbot/compat/transformers_fixes.py (private Trainer overrides),
tasks/train/distributed.py (one rank of several processes), castbot/model/folder.py (the saved folder and its card).
"""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

from prefect import task

from castbot.common.logs import run_logger
from castbot.config.training import TrainingConfig
from castbot.model.dialogue import DECODING_DEFAULTS, IGNORE_INDEX, DialogueFormat
from castbot.model.folder import ModelCard, load_tokenizer, load_weights, pick_precision
from tasks.train.checkpoints import CHECKPOINTS, latest_checkpoint, resumed_step


def _logger():
    return run_logger("castbot.finetune")


def load_model(base_model: str, config: TrainingConfig, pad_token_id: int):
    """The base model, wrapped with LoRA adapters when config.method is lora (SDPA attention)."""
    model = load_weights(base_model, attn_implementation="sdpa")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(task_type="CAUSAL_LM", r=config.lora.r, lora_alpha=config.lora.alpha,
                          lora_dropout=config.lora.dropout, target_modules=config.lora.target_modules or "all-linear",
                          fan_in_fan_out=model.config.model_type == "gpt2")  # GPT-2's Conv1D stores W transposed
        model = get_peft_model(model, lora)
    return model


def broadcast(value):
    """Rank 0's value on every rank (one process: unchanged)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_model(base_model: str, datasets, config: TrainingConfig, output_dir: str, run_id: str | None = None,
                card: ModelCard | None = None, callbacks: list | None = None) -> dict:
    """Train (resuming from output_dir's newest complete checkpoint), save the model; return run figures.
    card: what castbot.json records (default: eos format, 128 tokens); callbacks: more TrainerCallbacks (a study's
    pruning)."""
    from transformers import DataCollatorForSeq2Seq, EarlyStoppingCallback, PrinterCallback

    from tasks.train.trainer import CountingTrainer, LoopTimer, LossToMlflow, training_arguments

    logger = _logger()
    output = Path(output_dir)
    precision = pick_precision(config.precision)
    tokenizer = load_tokenizer(base_model)
    tokenizer.padding_side = "right"  # training pads on the right; the saved tokenizer pads left for generation
    model = load_model(base_model, config, tokenizer.pad_token_id)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    card = card or ModelCard(format=DialogueFormat(), max_length=128, base_model=base_model)
    timer = LoopTimer()
    callbacks = [timer, LossToMlflow(run_id, logger), *(callbacks or [])]
    if config.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(config.early_stopping_patience, config.early_stopping_threshold))
    trainer = CountingTrainer(
        model=model,
        args=training_arguments(config, output / CHECKPOINTS, precision),
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # progress goes through the Prefect logger instead
    resume = latest_checkpoint(output / CHECKPOINTS) if trainer.is_world_process_zero() else None
    resume = broadcast(resume)
    start_step = resumed_step(resume)
    if resume:
        logger.info("resuming from %s (step %d)", resume, start_step)
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - timer.started - trainer.seconds_aside  # s in steps, not eval or saving

    figures = {
        "train_precision_bf16": float(precision == "bf16"),
        "train_processes": float(trainer.args.world_size),  # DDP ranks; tokens below are this rank's
        "train_resumed_from_step": float(start_step),
        "train_global_step": float(trainer.state.global_step),
        "train_trainable_params": float(trainable),
        "train_tokens": float(trainer.tokens_real),  # this process's real (non-padding) tokens
        "train_tokens_processed": float(trainer.tokens_total),  # real + padding
        "train_padding_fraction": 1 - trainer.tokens_real / max(trainer.tokens_total, 1),
        "train_seconds": seconds,
        "train_tokens_per_s": trainer.tokens_real / max(seconds, 1e-9),  # real tokens/s, padding excluded
    }
    if trainer.is_world_process_zero():
        save_final(trainer, tokenizer, output / "model", config, card)
    return {**figures, "precision": precision, "model_path": str(output / "model"),
            "log_history": trainer.state.log_history}


def save_final(trainer, tokenizer, final: Path, config: TrainingConfig, card: ModelCard) -> None:
    """The trained model with its tokenizer, castbot.json and trainer state.

    LoRA saves the adapters alone (about 20 MB for SmolLM2-135M at r=16, against 538 MB for the merged model)
    and names the base in castbot.json: a nightly candidate that is not promoted costs little in the registry.
    castbot.model.folder.load_weights merges them into the base on load; the Bento stores the merged model.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    tokenizer.padding_side = "left"
    generation = model.generation_config if config.method == "full" else model.get_base_model().generation_config
    generation.pad_token_id = tokenizer.pad_token_id
    generation.max_new_tokens = DECODING_DEFAULTS["max_new_tokens"]
    model.save_pretrained(str(final))
    tokenizer.save_pretrained(str(final))
    card.model_copy(update={"base_model": card.base_model if config.method == "lora" else None}).save(final)
    trainer.state.save_to_json(str(final / "trainer_state.json"))


def plot_loss_curve(log_history: list[dict], path: Path) -> Path:
    """PNG of training loss and validation loss against optimiser step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label, style in ((train, "train", "-"), (val, "validation", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set(xlabel="optimiser step", ylabel="loss (nats per target token)", title="Fine-tuning loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def launch_distributed(base_model: str, datasets, config: TrainingConfig, output: Path, run_id: str,
                       card: ModelCard | None) -> dict:
    """Run train_model on config.processes ranks with `accelerate launch` (tasks/train/distributed.py is each
    rank's entry point); rank 0 writes the figures."""
    datasets.save_to_disk(str(output / "datasets"))
    spec = output / "launch.json"
    spec.write_text(json.dumps({"base_model": base_model, "config": config.model_dump(mode="json"),
                                "output_dir": str(output), "run_id": run_id,
                                "card": card and card.model_dump(mode="json")}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(config.processes)]
    if config.accelerate_config:
        command += ["--config_file", config.accelerate_config]
    subprocess.run([*command, "-m", "tasks.train.distributed", str(spec)], check=True)
    return json.loads((output / "figures.json").read_text())


@task(name="fine_tune")
def fine_tune(base_model: str, datasets, config: TrainingConfig, output_dir: str, run_id: str,
              card: ModelCard | None = None) -> str:
    """Train from base_model (resuming from output_dir's last checkpoint); returns the saved model folder."""
    from mlflow import MlflowClient

    logger = _logger()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if config.processes > 1:
        result = launch_distributed(base_model, datasets, config, output, run_id, card)
    else:
        result = train_model(base_model, datasets, config, output_dir, run_id, card)
    client = MlflowClient()
    for key, value in result.items():
        if isinstance(value, float) and math.isfinite(value):
            client.log_metric(run_id, key, value)
    client.log_artifact(run_id, str(plot_loss_curve(result["log_history"], output / "loss_curve.png")))
    logger.info("trained %s to step %d (resumed from %d): %.0f real tokens/s (%s), padding %.1f%% of %d tokens",
                config.method, result["train_global_step"], result["train_resumed_from_step"],
                result["train_tokens_per_s"], result["precision"], 100 * result["train_padding_fraction"],
                result["train_tokens_processed"])
    return result["model_path"]
