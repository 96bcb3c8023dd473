"""The pipeline's configuration: one pydantic model, loaded from a YAML profile or the Prefect UI form."""

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ColumnMap(Strict):
    episode: str = Field("episode", description="Source column holding the episode (or film, or conversation) id.")
    speaker: str = Field("speaker", description="Source column holding the speaker's name.")
    line: str = Field("line", description="Source column holding the spoken text.")
    scene: str | None = Field(None, description="Optional source column holding the scene id within an episode.")


class DataConfig(Strict):
    path: str = Field(
        ...,
        description="Transcript file (.csv, .jsonl, .parquet), relative to the profile's folder, "
        "or 'chatterbot:LANGUAGE' for the corpus shipped with chatterbot-corpus.",
    )
    columns: ColumnMap = Field(default_factory=ColumnMap, description="Which source columns hold episode, speaker, line.")
    delimiter: str = Field(",", min_length=1, max_length=1, description="CSV field delimiter.")


class ValidationConfig(Strict):
    min_rows: int = Field(50, ge=1, description="Fewest transcript rows accepted.")
    min_character_lines: int = Field(30, ge=1, description="Fewest lines the target character must speak.")
    max_line_chars: int = Field(2000, ge=10, description="Longest accepted line, in characters.")
    max_null_fraction: float = Field(0.0, ge=0, le=1, description="Largest share of empty speaker/line values allowed.")


class DialogueConfig(Strict):
    context_turns: int = Field(7, ge=0, le=50, description="Previous lines of the same episode/scene used as context.")
    max_length: int = Field(128, ge=16, le=1024, description="Longest tokenised sample; context is cut from the left.")
    loss_on: Literal["response", "all"] = Field("response", description="Train on the response tokens only, or on all.")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of episodes held out for validation.")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of episodes held out for the perplexity test.")


class OfflineModelConfig(Strict):
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


class TrainingConfig(Strict):
    epochs: float = Field(3.0, gt=0, le=100, description="Passes over the training split.")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimiser steps (-1: use epochs).")
    batch_size: int = Field(16, ge=1, le=1024, description="Samples per device per step.")
    grad_accum: int = Field(1, ge=1, le=256, description="Gradient accumulation steps.")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Peak learning rate.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming the learning rate up.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."
    )
    eval_steps: int = Field(50, ge=1, description="Validation loss every N steps.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps (resume loses at most this many).")
    seed: int = Field(42, description="Seed for splits, initialisation and data order.")


class GateConfig(Strict):
    max_perplexity: float = Field(1e6, gt=1, description="A candidate with a higher test perplexity is never promoted.")
    min_improvement: float = Field(
        0.01, ge=0, lt=1, description="Relative perplexity drop over the champion needed to promote (0.01 = 1%)."
    )


class RegistryConfig(Strict):
    model_name: str | None = Field(None, description="Registered model name; default '<character>-bot'.")
    experiment: str = Field("castbot", description="MLflow experiment for training runs.")
    build_bento: bool = Field(True, description="Build a Bento when the gate promotes a model.")


class PipelineConfig(Strict):
    data: DataConfig
    character: str = Field(..., min_length=1, description="Speaker whose lines the bot learns to say.")
    base_model: str = Field(
        "offline-tiny", description="'offline-tiny', a Hugging Face id or a local folder, e.g. microsoft/DialoGPT-small."
    )
    offline_model: OfflineModelConfig = Field(default_factory=OfflineModelConfig, description="Shape of offline-tiny.")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="Data quality thresholds.")
    dialogue: DialogueConfig = Field(default_factory=DialogueConfig, description="How samples are built and split.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Fine-tuning settings.")
    gate: GateConfig = Field(default_factory=GateConfig, description="When a candidate becomes champion.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="MLflow registry and Bento.")

    @property
    def model_name(self) -> str:
        return self.registry.model_name or f"{self.character.lower().replace(' ', '-')}-bot"

    def digest(self) -> str:
        """sha256 of the resolved config: the same settings give the same hash."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


class ConfigError(ValueError):
    """A profile that cannot be used; the message names the file and each bad key."""


def load_profile(path: str | Path) -> PipelineConfig:
    """Read a YAML profile; relative data paths resolve against the profile's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: profile not found")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a profile is a YAML mapping, got {type(raw).__name__}")
    data_path = (raw.get("data") or {}).get("path")
    if isinstance(data_path, str) and not data_path.startswith("chatterbot:") and not Path(data_path).is_absolute():
        raw["data"]["path"] = str((path.parent / data_path).resolve())
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: invalid profile\n{problems}") from None
