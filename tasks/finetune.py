"""Fine-tune a causal LM on tokenised dialogues with transformers' Trainer.

Full fine-tuning or LoRA (merged before saving), bf16/fp16 autocast where the device has it, length-grouped
batches (padding is measured and reported), and checkpoints that a rerun resumes from.

Several processes (DDP on a GPU node): `training.processes > 1` makes the task run this module under
`accelerate launch` (see configs/accelerate/multi-gpu.yaml); every rank runs the same `train_model`.
"""

import hashlib
import json
import math
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import task

from castbot.config import TrainingConfig
from castbot.dialogue import DECODING_DEFAULTS, IGNORE_INDEX, DialogueFormat
from tasks.logs import run_logger

CHECKPOINTS = "checkpoints"


def work_folder(data_sha256: str, config_digest: str) -> Path:
    """Same data + config -> same folder, so an interrupted run resumes from its checkpoints."""
    from castbot.settings import STATE_DIR

    return STATE_DIR / "runs" / hashlib.sha256(f"{data_sha256}{config_digest}".encode()).hexdigest()[:16]


def _logger():
    return run_logger("castbot.finetune")


def pick_precision(requested: str) -> str:
    """auto: bf16 on GPUs that support it, fp16 (with a loss scaler) on older GPUs, bf16 on CPUs with native
    bf16 (AVX512-BF16 or AMX), else fp32.

    Measured on this project's 2-core AVX512-BF16 CPU (bench/train_throughput.py, Rick and Morty, offline
    model): bf16 autocast trains 1.7-1.9x faster than fp32; test perplexity bf16/fp32 was 1.016 on the raw
    transcript and 0.73 on the cleaned one (runs diverge on 300 samples; bf16 was never worse by > 2%).
    """
    import torch

    if requested == "fp16" and not torch.cuda.is_available():
        raise ValueError("training.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if native_bf16 else "fp32"  # without native bf16, autocast emulates it and is slower


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
    log = _logger()
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


class LengthBucketSampler:
    """Sample indices so that each run of batch_size consecutive indices has similar lengths.

    Per epoch: shuffle, cut into mega-batches of `mega` batches, sort each by length, cut into batches,
    shuffle the batch order. transformers' LengthGroupedSampler sizes mega-batches as len/(4*batch), which
    on a few hundred dialogues leaves ~6% padding; 50 batches per mega-batch leaves well under 5%.
    Deterministic for (seed, epoch), so a resumed run skips exactly the batches it already trained on.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, mega: int = 50):
        self.lengths, self.batch_size, self.seed, self.mega, self.epoch = list(lengths), batch_size, seed, mega, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        span = self.mega * self.batch_size
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # only the very last batch can be short; it stays last, or every later batch would straddle two buckets
        full = len(batches) - (len(batches[-1]) < self.batch_size if batches else 0)
        for b in torch.randperm(full, generator=generator).tolist() + list(range(full, len(batches))):
            yield from batches[b]


def _trainer_classes(run_id: str | None, logger):
    """Trainer and callback classes, built here so that importing this module stays free of transformers."""
    from transformers import Trainer, TrainerCallback

    class CountingTrainer(Trainer):
        """Counts real and padded training tokens; times evaluation and checkpointing apart from training."""

        tokens_real = tokens_total = 0
        seconds_aside = 0.0
        loop_started = None  # perf_counter at on_train_begin: after optimizer/dataloader setup, before step 1

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_train_sampler(train_dataset)
            return LengthBucketSampler([len(ids) for ids in dataset["input_ids"]],
                                       self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                       self.args.data_seed)

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]  # (batch, seq): 1 for a real token, 0 for padding
            self.tokens_real += int(mask.sum())
            self.tokens_total += mask.numel()
            return super().training_step(model, inputs, num_items_in_batch)

        def _aside(self, method, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds_aside += time.perf_counter() - start

        def evaluate(self, *args, **kwargs):
            return self._aside(super().evaluate, *args, **kwargs)

        def _save_checkpoint(self, *args, **kwargs):
            return self._aside(super()._save_checkpoint, *args, **kwargs)

        def _load_best_model(self, *args, **kwargs):
            return self._aside(super()._load_best_model, *args, **kwargs)

    class LossToMlflow(TrainerCallback):
        """Send logged loss / eval_loss to the MLflow run and the Prefect log (rank 0 only)."""

        def __init__(self):
            self.client = None
            if run_id:
                from mlflow import MlflowClient

                self.client = MlflowClient()

        def on_train_begin(self, args, state, control, **kwargs):
            CountingTrainer.loop_started = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:
                return
            metrics = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            if self.client:
                for key, value in metrics.items():
                    self.client.log_metric(run_id, key, value, step=state.global_step)
            logger.info("step %d/%d %s", state.global_step, state.max_steps,
                        " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    return CountingTrainer, LossToMlflow


def clear_work_folder(folder: Path) -> None:
    """A finished run's checkpoints and downloaded champion go: a rerun of the same data and config trains afresh."""
    import shutil

    for name in (CHECKPOINTS, "champion"):
        shutil.rmtree(Path(folder) / name, ignore_errors=True)


def load_model(base_model: str, config: TrainingConfig, pad_token_id: int):
    """The base model, wrapped with LoRA adapters when config.method is lora (SDPA attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, attn_implementation="sdpa")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(task_type="CAUSAL_LM", r=config.lora.r, lora_alpha=config.lora.alpha,
                          lora_dropout=config.lora.dropout, target_modules=config.lora.target_modules or "all-linear",
                          fan_in_fan_out=model.config.model_type == "gpt2")  # GPT-2's Conv1D stores W transposed
        model = get_peft_model(model, lora)
    return model


def training_arguments(config: TrainingConfig, checkpoints: Path, precision: str):
    """TrainingArguments from the config: the one place the Trainer's behaviour is set."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a share of all steps
        weight_decay=config.weight_decay,
        bf16=precision == "bf16",  # autocast; weights and optimizer state stay fp32
        fp16=precision == "fp16",  # autocast + dynamic loss scaler
        use_cpu=not torch.cuda.is_available(),
        torch_compile=config.compile,
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,  # the newest and the best
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        logging_steps=max(1, config.eval_steps // 5),
        train_sampling_strategy=config.batching,  # group_by_length: LengthBucketSampler (training), grouped eval
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        disable_tqdm=True,
        # on a GPU, collate in worker processes so the GPU does not wait on Python padding; on CPU they
        # would take the cores the model needs
        dataloader_num_workers=2 if torch.cuda.is_available() else 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
    )


@dataclass(frozen=True)
class ModelCard:
    """What a trained model folder records beside its weights (castbot.json): how to prompt it, and for a LoRA
    adapter, which base model it applies to."""

    format: DialogueFormat = DialogueFormat()
    max_length: int = 128  # tokens of the longest training sample: the service's prompt budget
    base_reference: str = ""  # a packaged name (smollm2-135m), hub id or folder


def train_model(base_model: str, datasets, config: TrainingConfig, output_dir: str, run_id: str | None = None,
                card: ModelCard = ModelCard()) -> dict:
    """Train (resuming from output_dir's newest complete checkpoint), save the model; return run figures."""
    from transformers import DataCollatorForSeq2Seq, EarlyStoppingCallback, PrinterCallback

    from tasks.tokenize import load_tokenizer

    logger = _logger()
    output = Path(output_dir)
    precision = pick_precision(config.precision)
    tokenizer = load_tokenizer(base_model)
    tokenizer.padding_side = "right"  # training pads on the right; the saved tokenizer pads left for generation
    model = load_model(base_model, config, tokenizer.pad_token_id)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    CountingTrainer, LossToMlflow = _trainer_classes(run_id, logger)
    callbacks = [LossToMlflow()]
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
    resume = _broadcast(resume)
    start_step = int(json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]) if resume else 0
    if resume:
        logger.info("resuming from %s (step %d)", resume, start_step)
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - trainer.loop_started - trainer.seconds_aside  # s in steps, not eval or saving

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


def _broadcast(value):
    """Rank 0's value on every rank (one process: unchanged)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_final(trainer, tokenizer, final: Path, config: TrainingConfig, card: ModelCard) -> None:
    """The trained model with its tokenizer, castbot.json and trainer state.

    LoRA saves the adapters alone (about 20 MB for SmolLM2-135M at r=16, against 538 MB for the merged model)
    and names the base in castbot.json: a nightly candidate that is not promoted costs little in the registry.
    castbot.bot.load_weights merges them into the base on load; the Bento stores the merged model.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    tokenizer.padding_side = "left"
    generation = model.generation_config if config.method == "full" else model.get_base_model().generation_config
    generation.pad_token_id = tokenizer.pad_token_id
    generation.max_new_tokens = DECODING_DEFAULTS["max_new_tokens"]
    model.save_pretrained(str(final))
    tokenizer.save_pretrained(str(final))
    card.format.save(final, card.max_length, card.base_reference if config.method == "lora" else None)
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


def _launch_distributed(base_model: str, datasets, config: TrainingConfig, output: Path, run_id: str,
                        card: ModelCard) -> dict:
    """Run train_model on config.processes ranks with `accelerate launch`; rank 0 writes the figures."""
    datasets.save_to_disk(str(output / "datasets"))
    spec = output / "launch.json"
    spec.write_text(json.dumps({"base_model": base_model, "config": config.model_dump(mode="json"),
                                "output_dir": str(output), "run_id": run_id, "card": asdict(card)}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(config.processes)]
    if config.accelerate_config:
        command += ["--config_file", config.accelerate_config]
    subprocess.run([*command, "-m", "tasks.finetune", str(spec)], check=True)
    return json.loads((output / "figures.json").read_text())


@task(name="fine_tune")
def fine_tune(base_model: str, datasets, config: TrainingConfig, output_dir: str, run_id: str,
              card: ModelCard = ModelCard()) -> str:
    """Train from base_model (resuming from output_dir's last checkpoint); returns the saved model folder."""
    from mlflow import MlflowClient

    logger = _logger()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if config.processes > 1:
        result = _launch_distributed(base_model, datasets, config, output, run_id, card)
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


def _rank_main(spec_path: str) -> None:
    """Entry point of each `accelerate launch` rank."""
    from datasets import load_from_disk

    spec = json.loads(Path(spec_path).read_text())
    output = Path(spec["output_dir"])
    card = spec["card"]
    card = ModelCard(DialogueFormat(**card["format"]), card["max_length"], card["base_reference"])
    result = train_model(spec["base_model"], load_from_disk(str(output / "datasets")),
                         TrainingConfig.model_validate(spec["config"]), str(output), spec["run_id"], card)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        (output / "figures.json").write_text(json.dumps(result))
    if dist.is_initialized():  # left to interpreter exit, gloo's threads can abort a rank (SIGABRT) after the work
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(sys.argv[1])
