"""The tune: section of a profile, read by the study (flows/tune.py): the search space and how trials run."""

from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, model_validator

from castbot.config.base import Strict
from castbot.config.data import DialogueConfig
from castbot.config.training import LoraSettings, TrainingConfig


class SearchRange(Strict):
    """How one setting varies in a study: a float or int range (log scale optional) or a list of choices."""

    type: Literal["float", "int", "categorical"] = Field(..., description="float and int: a range from low to high; "
                                                         "categorical: one of choices.")
    low: int | float | None = Field(None, description="Smallest value of a float or int range (inclusive).")
    high: int | float | None = Field(None, description="Largest value of a float or int range (inclusive).")
    log: bool = Field(False, description="Sample a float or int range on a log scale (low must be > 0).")
    choices: list[Any] | None = Field(None, description="The values a categorical setting takes, tried as written.")

    @model_validator(mode="after")
    def _range_or_choices(self):
        if self.type == "categorical":
            if not self.choices or self.low is not None or self.high is not None or self.log:
                raise ValueError("a categorical setting needs a non-empty 'choices' list and no low/high/log")
            return self
        if self.choices is not None or self.low is None or self.high is None:
            raise ValueError(f"a {self.type} range needs 'low' and 'high' and no 'choices'")
        if self.low >= self.high:
            raise ValueError(f"empty or inverted range: low {self.low} is not below high {self.high}")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"an int range needs whole bounds, got {self.low}..{self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0, got {self.low}")
        return self

    def values(self) -> list:
        """The values whose validity decides the range's: its bounds, or every choice."""
        if self.type == "categorical":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.type == "int" else [self.low, self.high]


class PrunerConfig(Strict):
    kind: Literal["median", "none"] = Field(
        "median", description="median: stop a trial whose validation loss at an evaluation is worse than the median of "
        "earlier trials' at the same step (Optuna's MedianPruner); none: every trial runs to the end.",
    )
    startup_trials: int = Field(2, ge=0, le=100, description="Trials that finish before any is pruned.")
    warmup_steps: int = Field(0, ge=0, description="Optimiser steps of a trial before it may be pruned.")


# Settings a study may vary: training.*, training.lora.* and dialogue.* fields, minus these, whose change would make
# validation losses incomparable (another split, another token format, loss on other tokens) or that move the
# evaluation grid the pruner compares trials on, or that do not change what is learnt.
NOT_SEARCHABLE = {
    "dialogue.val_fraction": "it changes the validation split, so losses would not compare",
    "dialogue.test_fraction": "it changes the validation split, so losses would not compare",
    "dialogue.format": "it changes the tokens validation loss is counted on",
    "dialogue.loss_on": "it changes the tokens validation loss is counted on",
    "training.eval_steps": "the pruner compares trials at the same evaluation steps",
    "training.save_steps": "checkpoints must fall on evaluations",
    "training.processes": "trials run in one process",
    "training.accelerate_config": "trials run in one process",
    "training.compile": "it changes speed, not what is learnt",
    "training.lora.target_modules": "lists are not searchable",
}


def searchable_field(key: str):
    """The pydantic FieldInfo a dotted key names, or ValueError saying why it cannot be searched."""
    if key in NOT_SEARCHABLE:
        raise ValueError(f"'{key}' cannot be searched: {NOT_SEARCHABLE[key]}")
    owners = {"training": TrainingConfig, "training.lora": LoraSettings, "dialogue": DialogueConfig}
    owner, _, name = key.rpartition(".")
    model = owners.get(owner)
    if model is None or name not in model.model_fields or name == "lora":
        raise ValueError(f"'{key}' is not a setting a study can vary: use a dotted name under training., "
                         "training.lora. or dialogue. (e.g. training.learning_rate)")
    return model.model_fields[name]


def check_search_value(key: str, value) -> None:
    """ValueError naming the key when value is not allowed for the setting (type and bounds of its field)."""
    field = searchable_field(key)
    try:
        TypeAdapter(Annotated[field.annotation, field]).validate_python(value)
    except ValidationError as exc:
        raise ValueError(f"'{key}': {value!r} is not a valid value ({exc.errors()[0]['msg']})") from None


def default_space(training: TrainingConfig, dialogue: DialogueConfig) -> dict[str, SearchRange]:
    """The search space when a profile gives none: learning rate, length, context and, for LoRA, the adapters.
    LoRA's learning rates sit ~10x above full fine-tuning's (the Rick runs: full needed 1e-4, LoRA 1e-3 to 2e-3).
    Context is left out when the loss counts context tokens (dialogue.loss_on all): losses would not compare."""
    space = {}
    if dialogue.loss_on == "response":
        space["dialogue.context_turns"] = SearchRange(type="int", low=2, high=8)
    if training.max_steps > 0:  # steps set: epochs do nothing, so vary the steps around the profile's
        low = max(training.eval_steps, training.max_steps // 2)  # a trial reaches at least one validation
        space["training.max_steps"] = SearchRange(type="int", low=low, high=max(low + 1, 2 * training.max_steps))
    else:
        space["training.epochs"] = SearchRange(type="float", low=1.0, high=4.0)
    if training.method == "lora":
        space["training.learning_rate"] = SearchRange(type="float", low=1e-4, high=3e-3, log=True)
        space["training.lora.r"] = SearchRange(type="categorical", choices=[8, 16, 32])
        space["training.lora.alpha"] = SearchRange(type="categorical", choices=[16, 32, 64])
        space["training.lora.dropout"] = SearchRange(type="float", low=0.0, high=0.2)
    else:
        space["training.learning_rate"] = SearchRange(type="float", low=1e-5, high=1e-3, log=True)
    return space


class TuneConfig(Strict):
    """A hyper-parameter study (flows/tune.py): which settings vary, how many trials, when to stop one early."""

    space: dict[str, SearchRange] | None = Field(
        None, description="Dotted setting -> range or choices, e.g. {training.learning_rate: {type: float, low: 1e-4, "
        "high: 3e-3, log: true}}. None: the default space for the profile's method "
        "(castbot/config/search.py: default_space).",
    )
    enqueue: list[dict[str, Any]] = Field(
        default_factory=list, description="Settings tried first, in order, after the profile's own (always trial 0): "
        "e.g. a hand-tuned run to compare with. Each key must be in the space.",
    )
    trials: int = Field(12, ge=1, le=1000, description="Finished (complete or pruned) trials the study runs to.")
    budget_minutes: float | None = Field(
        None, gt=0, description="Start no trial after this many minutes (a running trial finishes). None: no limit.",
    )
    pruner: PrunerConfig = Field(default_factory=PrunerConfig, description="When a trial is stopped early.")
    heartbeat_seconds: int = Field(
        30, ge=1, le=3600, description="A running trial writes a heartbeat this often; one silent for twice as long "
        "belongs to a killed process and is marked failed (and retried) when the study runs again.",
    )
    max_retry: int = Field(1, ge=0, le=10, description="Times a killed trial is run again with its settings.")
    experiment: str = Field("castbot-tune", min_length=1, description="MLflow experiment of study and trial runs.")

    @model_validator(mode="after")
    def _settings_exist(self):
        for key, spec in (self.space or {}).items():
            try:
                field = searchable_field(key)
            except ValueError as exc:
                raise ValueError(f"tune.space.{key}: {exc}") from None
            if spec.type == "float" and field.annotation is int:
                raise ValueError(f"tune.space.{key}: the setting is a whole number: use type int")
            for value in spec.values():
                try:
                    check_search_value(key, value)
                except ValueError as exc:
                    raise ValueError(f"tune.space.{key}: {exc}") from None
        return self

    def space_for(self, training: TrainingConfig, dialogue: DialogueConfig) -> dict[str, SearchRange]:
        """space, or the default space for these training and dialogue settings."""
        return self.space if self.space is not None else default_space(training, dialogue)


def search_space_problems(tune: TuneConfig, training: TrainingConfig, dialogue: DialogueConfig) -> list[str]:
    """What in tune.space / tune.enqueue cannot work with the profile's training and dialogue settings, each naming
    its key."""
    space = tune.space_for(training, dialogue)
    problems = []
    if "training.epochs" in space and training.max_steps > 0 and "training.max_steps" not in space:
        problems.append(f"tune.space.training.epochs: training.max_steps is {training.max_steps}, which overrides "
                        "epochs; search training.max_steps instead, or set training.max_steps: -1")
    if training.method == "full" and "training.method" not in space:
        problems += [f"tune.space.{key}: LoRA settings do nothing with training.method full"
                     for key in space if key.startswith("training.lora.")]
    if dialogue.loss_on == "all":
        problems += [f"tune.space.{key}: with dialogue.loss_on all the validation loss counts context tokens, so "
                     "trials with other contexts would not compare" for key in space
                     if key in ("dialogue.context_turns", "dialogue.max_length")]
    steps = space.get("training.max_steps")
    if steps is not None and min(steps.values()) < training.eval_steps:
        problems.append(f"tune.space.training.max_steps: {min(steps.values())} steps end before the first validation "
                        f"(training.eval_steps {training.eval_steps}): the trial would have no loss to compare")
    for i, settings in enumerate(tune.enqueue):
        for key, value in settings.items():
            spec = space.get(key)
            if spec is None:
                problems.append(f"tune.enqueue[{i}].{key}: not in the search space ({', '.join(space)})")
            elif not (value in spec.choices if spec.type == "categorical"
                      else isinstance(value, (int, float)) and spec.low <= value <= spec.high):
                problems.append(f"tune.enqueue[{i}].{key}: {value!r} lies outside its search range")
    return problems
