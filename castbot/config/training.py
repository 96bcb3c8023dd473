"""The training sections of a profile: the offline stand-in model's shape, LoRA adapters, the fine-tuning run."""

from typing import Literal

from pydantic import Field, model_validator

from castbot.config.base import Strict


class OfflineModelConfig(Strict):
    architecture: Literal["gpt2", "llama"] = Field(
        "gpt2", description="gpt2: GPT-2 blocks, eos-joined turns; llama: Llama blocks and a ChatML chat template "
        "(the SmolLM2 layout in miniature, for tests).",
    )
    vocab_size: int = Field(4096, ge=300, le=65536, description="BPE vocabulary of the offline tokenizer.")
    n_layer: int = Field(4, ge=1, le=48, description="Transformer blocks of the offline model.")
    n_embd: int = Field(128, ge=32, le=2048, description="Hidden size of the offline model (multiple of n_head).")
    n_head: int = Field(4, ge=1, le=32, description="Attention heads of the offline model.")
    n_positions: int = Field(256, ge=64, le=4096, description="Position table of the offline model, in tokens.")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"offline_model.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        return self


class LoraSettings(Strict):
    r: int = Field(8, ge=1, le=256, description="LoRA rank of the adapters.")
    alpha: int = Field(16, ge=1, le=1024, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0, le=0.5, description="Dropout on the adapters' input.")
    target_modules: list[str] | None = Field(
        None, min_length=1,
        description="Module names that get adapters, e.g. [q_proj, v_proj]; default: every linear layer but the "
        "output head (peft's all-linear), which fits any architecture.",
    )


DEFAULT_LEARNING_RATE = {"lora": 1e-3, "full": 1e-4}
EVAL_EVERY = 50


class TrainingConfig(Strict):
    method: Literal["full", "lora"] = Field(
        "full", description="full: train every weight; lora: train low-rank adapters (merged into the saved model)."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Adapter settings, used when method is lora.")
    epochs: float = Field(3.0, gt=0, le=100, description="Passes over the training split.")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimiser steps (-1: use epochs).")
    batch_size: int = Field(16, ge=1, le=1024, description="Samples per device per step.")
    grad_accum: int = Field(1, ge=1, le=256, description="Gradient accumulation steps.")
    learning_rate: float | None = Field(  # None only until validated: the method's default
        None, gt=0, le=1,
        description="Peak learning rate; default by method: lora 1e-3, full 1e-4 (docs/training.md: defaults)."
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming the learning rate up.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp16 on older GPUs, bf16 on CPUs with "
        "AVX512-BF16/AMX, else fp32 (measured fastest with perplexity within 2%: bench/train_throughput.py)."
    )
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate decay after the warm-up."
    )
    batching: Literal["group_by_length", "random"] = Field(
        "group_by_length",
        description="group_by_length: batches of similar length (little padding); random: plain shuffle."
    )
    compile: bool = Field(False, description="torch.compile the model (slow first steps; pays off on long GPU runs).")
    eval_steps: int = Field(
        EVAL_EVERY, ge=1, description=f"Validation loss every N steps; default {EVAL_EVERY}, or a quarter of "
        f"max_steps when that is under {4 * EVAL_EVERY}, so a short run still keeps its best checkpoint."
    )
    save_steps: int = Field(
        EVAL_EVERY, ge=1, description="Checkpoint every N steps (resume loses at most this many); default eval_steps."
    )
    early_stopping_patience: int = Field(
        3, ge=0, le=100, description="Stop after this many evaluations without a better validation loss (0: never)."
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0, le=1, description="Smallest validation-loss drop that counts as better."
    )
    processes: int = Field(
        1, ge=1, le=64,
        description="Training processes; above 1 the fine-tune step runs under `accelerate launch` (DDP)."
    )
    accelerate_config: str | None = Field(
        None, description="accelerate config file for processes > 1, e.g. configs/accelerate/multi-gpu.yaml."
    )
    seed: int = Field(42, description="Seed for splits, initialisation and data order.")

    @model_validator(mode="before")
    @classmethod
    def _learning_rate_of_the_method(cls, data):
        # adapters learn ~10x faster than full fine-tuning (Rick: full needed 1e-4, LoRA 1e-3 to 2e-3)
        if isinstance(data, dict) and data.get("learning_rate") is None:
            rate = DEFAULT_LEARNING_RATE.get(data.get("method"), DEFAULT_LEARNING_RATE["full"])
            data = {**data, "learning_rate": rate}
        return data

    @model_validator(mode="before")
    @classmethod
    def _short_runs_validate(cls, data):
        # 24 steps with validation every 50 never validate: no best checkpoint, no early stopping
        if not isinstance(data, dict):
            return data
        steps = data.get("max_steps")
        if data.get("eval_steps") is None and isinstance(steps, int) and 0 < steps < 4 * EVAL_EVERY:
            data = {**data, "eval_steps": max(1, steps // 4)}
        if data.get("save_steps") is None and data.get("eval_steps") is not None:
            data = {**data, "save_steps": data["eval_steps"]}  # checkpoints fall on evaluations
        return data

    @model_validator(mode="after")
    def _save_on_eval(self):
        # the best checkpoint is chosen at evaluations, so every checkpoint must fall on one
        if self.save_steps % self.eval_steps:
            raise ValueError(f"training.save_steps ({self.save_steps}) must be a multiple of "
                             f"training.eval_steps ({self.eval_steps})")
        return self
