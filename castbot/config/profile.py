"""A profile: the settings of one bot, loaded from a YAML file (configs/) or the Prefect UI form.

TrainRunConfig is everything a training run reads, and its digest() hashes exactly that; PipelineConfig (the
profile) adds the sections other flows read: monitor: (flows/monitor.py) and tune: (flows/tune.py).
"""

import hashlib
import json
import os
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from castbot.config.base import Strict
from castbot.config.data import CleaningConfig, DataConfig, DialogueConfig, ValidationConfig
from castbot.config.monitor import MonitorConfig
from castbot.config.release import EvaluationConfig, GateConfig, RegistryConfig
from castbot.config.search import SearchRange, TuneConfig, search_space_problems
from castbot.config.training import OfflineModelConfig, TrainingConfig


class TrainRunConfig(Strict):
    """What a training run reads (flows/train.py): its digest keys resumable work folders and champion freshness."""

    data: DataConfig = Field(..., description="The transcript: its file and columns, and extra training sources.")
    character: str = Field(..., min_length=1, description="Speaker whose lines the bot learns to say.")
    show: str | None = Field(None, description="Name of the show, for the chat format's system line "
                             "('You are Rick from Rick and Morty.').")
    base_model: str = Field(
        "offline-tiny", description="'smollm2-135m' (SmolLM2-135M-Instruct from the package index, verified and "
        "cached), 'offline-tiny' (a tiny model built from the training text, for tests), a Hugging Face id or a "
        "local folder. The default, offline-tiny, is the tests' stand-in: every profile in configs/ sets its own.",
    )
    offline_model: OfflineModelConfig = Field(default_factory=OfflineModelConfig, description="Shape of offline-tiny.")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="Data quality thresholds.")
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig, description="How the transcript is cleaned.")
    dialogue: DialogueConfig = Field(default_factory=DialogueConfig, description="How samples are built and split.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Fine-tuning settings.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="How replies are judged.")
    gate: GateConfig = Field(default_factory=GateConfig, description="When a candidate becomes champion.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="MLflow registry and Bento.")

    @property
    def model_name(self) -> str:
        return self.registry.model_name or f"{self.character.lower().replace(' ', '-')}-bot"

    def run_settings(self) -> dict:
        """The resolved settings of a training run as JSON values: TrainRunConfig's fields, also when called on a
        profile (whose monitor: and tune: sections change nothing a training run does). MLflow logs them as the
        run's params and config.yaml."""
        return self.model_dump(mode="json", include=set(TrainRunConfig.model_fields))

    def digest(self) -> str:
        """sha256 of run_settings(): the same settings give the same hash (champions registered before monitor:
        and tune: existed keep theirs)."""
        return hashlib.sha256(json.dumps(self.run_settings(), sort_keys=True).encode()).hexdigest()


class PipelineConfig(TrainRunConfig):
    """A profile: a training run's settings, with the monitor's thresholds and the hyper-parameter study."""

    monitor: MonitorConfig = Field(default_factory=MonitorConfig, description="Drift and health checks of the "
                                   "served bot (flows/monitor.py); not part of the training digest.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Hyper-parameter study (python -m flows.tune); "
                             "not part of the training digest.")

    @model_validator(mode="after")
    def _space_fits_profile(self):
        problems = search_space_problems(self.tune, self.training, self.dialogue)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def search_space(self) -> dict[str, SearchRange]:
        """tune.space, or the default space for this profile's training method."""
        return self.tune.space_for(self.training, self.dialogue)


class ConfigError(ValueError):
    """A profile that cannot be used; the message names the file and each bad key."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key '{key}' is given twice; "
                                  "only the last one would count")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_profile(path: str | Path) -> PipelineConfig:
    """Read a YAML profile and check the profiles it names in data.also_train_on."""
    config = _read_profile(path)
    try:
        also_train_on_profiles(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def _read_profile(path: str | Path) -> PipelineConfig:
    """Read one YAML profile; relative data paths resolve against the profile's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: profile not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a profile is a YAML mapping, got {type(raw).__name__}")
    data_path = (raw.get("data") or {}).get("path")
    if isinstance(data_path, str) and not data_path.startswith("chatterbot:") and not Path(data_path).is_absolute():
        # normpath, not resolve(): a symlinked data folder keeps the path the user wrote
        raw["data"]["path"] = os.path.normpath(path.parent.absolute() / data_path)
    others = (raw.get("data") or {}).get("also_train_on")
    if isinstance(others, list):
        raw["data"]["also_train_on"] = [
            os.path.normpath(path.parent.absolute() / p) if isinstance(p, str) and not Path(p).is_absolute() else p
            for p in others
        ]
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: invalid profile\n{problems}") from None


def also_train_on_profiles(config: PipelineConfig) -> dict[str, PipelineConfig]:
    """The profiles named in data.also_train_on, by file name: each of the same character, naming no further
    profiles, and no two with one name (the name keys their reports and lineage tags)."""
    profiles = {}
    for path in config.data.also_train_on:
        try:
            other = _read_profile(path)
        except ConfigError as exc:
            raise ConfigError(f"data.also_train_on: {exc}") from None
        name = Path(path).stem
        if name in profiles:
            raise ConfigError(f"data.also_train_on names two profiles called '{name}': rename one")
        if other.character != config.character:
            raise ConfigError(f"data.also_train_on names a profile of '{other.character}', "
                              f"not '{config.character}': its lines would teach another character")
        if other.data.also_train_on:
            raise ConfigError("data.also_train_on names a profile that has its own also_train_on: "
                              "list every transcript in this profile instead")
        profiles[name] = other
    return profiles
