"""The pipeline's configuration: one pydantic model, loaded from a YAML profile or the Prefect UI form."""

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ColumnMap(Strict):
    episode: str = Field("episode", description="Source column holding the episode (or film, or conversation) id.")
    speaker: str = Field("speaker", description="Source column holding the speaker's name.")
    line: str = Field("line", description="Source column holding the spoken text.")
    scene: str | None = Field(None, description="Optional source column holding the scene id within an episode.")
    season: str | None = Field(
        None, description="Optional source column holding the season, when episode numbers restart every season."
    )


class FeedbackConfig(Strict):
    """Served turns that users liked, from the conversation log (castbot/chatlog/store.py), as extra training samples."""

    enabled: bool = Field(False, description="Add the log's liked turns (thumbs up; never thumbs down or unrated) of "
                          "this bot to the training split as message -> reply samples. Validation and test stay the "
                          "transcript's, so the gate still decides on the same held-out episodes.")
    url: str | None = Field(None, description="SQLAlchemy URL of the conversation log; default CASTBOT_CHATLOG_URL, "
                            "else chatlog.db under CASTBOT_HOME.")
    model_name: str | None = Field(None, min_length=1, description="Registered model whose liked turns are used; "
                                   "default this profile's model name (registry.model_name or '<character>-bot').")
    since_days: int | None = Field(None, ge=1, le=3650, description="Only turns of the last N days; None: all.")


class DataConfig(Strict):
    path: str = Field(
        ...,
        description="Transcript file (.csv, .jsonl, .parquet), relative to the profile's folder, "
        "or 'chatterbot:LANGUAGE' for the corpus shipped with chatterbot-corpus.",
    )
    columns: ColumnMap = Field(default_factory=ColumnMap, description="Which source columns hold episode, speaker, line.")
    delimiter: str = Field(",", min_length=1, max_length=1, description="CSV field delimiter.")
    encoding: str = Field(
        "utf-8", min_length=1, description="Text encoding of a CSV/JSONL file. Non-UTF-8 files are refused unless "
        "named here (e.g. cp1252); they are then decoded with a warning."
    )
    interleaved: bool = Field(
        False, description="Each episode's rows come in several separated blocks (e.g. the LOTR scripts): every "
        "contiguous block becomes its own episode, so context never spans two blocks."
    )
    also_train_on: list[str] = Field(
        default_factory=list, description="Profiles of the same character whose transcripts add training episodes "
        "(never validation or test), each ingested, validated and cleaned by its own profile's rules. An episode "
        "that shares lines with this transcript is left out. In a YAML profile, paths are relative to its "
        "folder; in the Prefect form, to the working directory (the repository root in the deployments).",
    )
    feedback: FeedbackConfig = Field(
        default_factory=FeedbackConfig, description="Liked turns from the conversation log as training samples.",
    )


class ValidationConfig(Strict):
    min_rows: int = Field(50, ge=1, description="Fewest transcript rows accepted.")
    min_character_lines: int = Field(30, ge=1, description="Fewest lines the target character must speak.")
    max_line_chars: int = Field(2000, ge=10, description="Longest accepted line, in characters.")
    max_null_fraction: float = Field(
        0.01, ge=0, le=1, description="Largest share of empty speaker/line values allowed in the raw file."
    )
    max_raw_line_chars: int = Field(
        20000, ge=10, description="Longest raw value accepted before cleaning, in characters (catches runaway rows)."
    )
    max_markup_share: float = Field(
        0.01, ge=0, le=1, description="Largest share of cleaned lines still holding brackets or markup."
    )
    min_character_episodes: int = Field(
        3, ge=3, description="Fewest episodes in which the character speaks (train/validation/test split by episode)."
    )


class CleaningConfig(Strict):
    """What the cleaning step changes; each rule reports the rows and characters it touched."""

    strip_markup: bool = Field(True, description="Remove HTML tags and entities and forum markup ([b], [i], *...*).")
    fix_mojibake: bool = Field(True, description="Repair mis-decoded text (e.g. 'donÃ¢â‚¬â„¢t') with ftfy.")
    strip_stage_directions: bool = Field(True, description="Remove inline [...] and (...) stage directions.")
    direction_speakers: list[str] = Field(
        default_factory=lambda: ["Scene Directions", "Stage Directions"],
        description="Speaker labels whose rows are directions, not dialogue; those rows are dropped.",
    )
    normalize_whitespace: bool = Field(True, description="NBSP, tabs and embedded newlines to one space; trim.")
    speaker_case: Literal["keep", "majority", "title", "upper"] = Field(
        "majority", description="Speaker label case: keep; majority (case variants take the most frequent "
        "spelling); title ('FRODO' -> 'Frodo'); upper.",
    )
    aliases: dict[str, list[str]] = Field(
        default_factory=dict, description="Canonical speaker -> labels merged into it, e.g. "
        "{Rick: ['Pickle Rick', 'Rick Sanchez']} (matched ignoring case, after trimming and a trailing ':').",
    )
    multi_speaker: Literal["drop", "keep"] = Field(
        "drop", description="Rows spoken by several speakers at once ('Rick and Morty', '#ALL#'): drop or keep."
    )
    multi_speaker_pattern: str = Field(
        r"(?i)\s(?:and|&|\+)\s|\s*[,/]\s*|^#?all\b",
        description="Regex that marks a speaker label as several speakers.",
    )
    duplicates: Literal["keep", "consecutive", "all"] = Field(
        "consecutive", description="Exact duplicate rows (episode, scene, speaker, line): keep, drop a row that "
        "repeats the one before it, or drop every repeat (short replies legitimately repeat).",
    )

    @model_validator(mode="after")
    def _pattern_compiles(self):
        try:
            re.compile(self.multi_speaker_pattern)
        except re.error as exc:
            raise ValueError(f"cleaning.multi_speaker_pattern is not a valid regex: {exc}") from None
        return self


class DialogueConfig(Strict):
    context_turns: int = Field(7, ge=0, le=50, description="Previous lines of the same episode/scene used as context.")
    max_length: int = Field(128, ge=16, le=1024, description="Longest tokenised sample; context is cut from the left.")
    loss_on: Literal["response", "all"] = Field("response", description="Train on the response tokens only, or on all.")
    format: Literal["auto", "eos", "chat"] = Field(
        "auto", description="How turns become tokens (castbot/model/dialogue.py): chat = the model's chat template with a "
        "system line naming the character; eos = DialoGPT's turns joined by <eos>; auto = chat when the "
        "tokenizer has a chat template.",
    )
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of episodes held out for validation.")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of episodes held out for the perplexity test.")


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
        None, gt=0, le=1, description="Peak learning rate; default by method: lora 1e-3, full 1e-4 (README: defaults)."
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
        "group_by_length", description="group_by_length: batches of similar length (little padding); random: plain shuffle."
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
        1, ge=1, le=64, description="Training processes; above 1 the fine-tune step runs under `accelerate launch` (DDP)."
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
        "high: 3e-3, log: true}}. None: the default space for the profile's method (castbot.config.default_space).",
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


class EvaluationConfig(Strict):
    """How candidates are judged on what they say (tasks/evaluate/judge.py), beside perplexity."""

    replies: int = Field(32, ge=0, le=2000, description="Held-out test contexts each model answers (seeded choice; "
                         "0: judge perplexity only). Decoded with the service's defaults, in batches.")
    reference_model: str | None = Field(
        None, description="Model whose perplexity of a reply (given its context) measures fluency; default: the "
        "untuned base model. Word salad scores badly here whatever words it uses.",
    )
    seed: int = Field(0, description="Seed of the context choice and the sampled replies (the bootstrap intervals "
                      "use a fixed seed, so reruns compare).")


class GateConfig(Strict):
    max_perplexity: float = Field(1e6, gt=1, description="A candidate with a higher test perplexity is never promoted.")
    min_improvement: float = Field(
        0.01, ge=0, lt=1, description="Relative perplexity drop over the base model and the champion needed to "
        "promote (0.01 = 1%).",
    )
    noise_confidence: float = Field(
        0.95, ge=0, lt=1, description="Against the champion, the paired bootstrap interval (at this confidence) of "
        "the per-sample loss difference must lie below 0: better beyond the noise of a small test split. 0: off.",
    )
    min_likeness: float | None = Field(
        None, description="Least calibrated character likeness of the replies (0: like the other speakers, 1: like "
        "the character's real lines). None: not checked.",
    )
    likeness_tolerance: float = Field(
        0.1, ge=0, le=10, description="How much lower than the champion's the candidate's likeness may be.",
    )
    max_reply_perplexity: float | None = Field(
        None, gt=1, description="Largest perplexity of the replies under the reference model (fluency). None: not checked.",
    )
    max_repeat3_rate: float = Field(0.5, ge=0, le=1, description="Largest share of replies that repeat a word 3-gram.")
    max_echo_rate: float = Field(0.5, ge=0, le=1, description="Largest share of replies that copy the user's last turn.")
    max_empty_rate: float = Field(0.5, ge=0, le=1, description="Largest share of empty (no letter or digit) replies.")
    max_template_leak_rate: float = Field(
        0.1, ge=0, le=1, description="Largest share of replies holding template or role tokens (<|im_end|>, 'assistant').",
    )


class RegistryConfig(Strict):
    model_name: str | None = Field(None, description="Registered model name; default '<character>-bot'.")
    experiment: str = Field("castbot", description="MLflow experiment for training runs.")
    build_bento: bool = Field(True, description="Build a Bento when the gate promotes a model.")
    openvino: Literal["auto", "int8", "fp32", "off"] = Field(
        "auto", description="The Bento's model exported to OpenVINO when it is built, for the CPU engine (the "
        "default engine on CPU when present). auto: int8 weights when their test perplexity is within "
        "openvino_max_increase of the model's own, else fp32 (fp32 when the build has no test split); skipped, with a "
        "warning, when OpenVINO's exporter is not installed (make cpu-engines). int8/fp32: that export, or the build "
        "fails. off: none (the continuous engine serves).")
    openvino_max_increase: float = Field(
        0.01, ge=0, le=1, description="Largest relative rise of test perplexity int8 weights may cost under "
        "openvino: auto. Measured (demo, 93 test samples): fp32 IR -0.1 %, int8 +0.6 % against torch fp32.")


class MonitorConfig(Strict):
    """What the monitor flow (flows/monitor.py) checks in the chat log, and when it raises an event."""

    window_hours: float = Field(24.0, gt=0, le=24 * 90, description="Hours of the chat log each monitor run reads.")
    min_turns: int = Field(100, ge=2, le=100000, description="Fewest turns of the champion in the window for any "
                           "verdict; below: 'not enough data'. Measured (bench/monitor.py, Rick reference, 8 draws): "
                           "at 100 turns every draw of LOTR and Friends read as drift and none of held-out Rick; at "
                           "30, 5 of 8 Friends draws did.")
    reference_size: int = Field(2000, ge=50, le=50000, description="Training contexts and character lines sampled "
                                "(seeded) into the reference stored with each registered version.")
    classifier_cap: int = Field(2000, ge=50, le=50000, description="Most user messages (a seeded sample) the "
                                "drift classifier sees; the vocabulary and length checks read all of them.")
    permutations: int = Field(10, ge=2, le=200, description="Label permutations whose AUCs give the drift "
                              "threshold (the noise of the classifier on this many turns).")
    permutation_quantile: float = Field(0.95, gt=0.5, lt=1, description="Quantile of the permuted AUCs used as "
                                        "the threshold: 0.95 = a 5% false alarm rate when nothing drifted.")
    min_drift_auc: float = Field(0.65, ge=0.5, le=1, description="Smallest ROC AUC that counts as drift whatever the "
                                 "permutations say: held-out episodes of the same show are told from the training "
                                 "ones a little (other guests, topics). Measured, Rick reference, 100 turns, 8 "
                                 "draws: held-out Rick 0.54-0.60, Friends 0.69-0.80, LOTR 0.82-0.88; Spanish 1.00.")
    max_oov_increase: float = Field(0.15, ge=0, le=1, description="Largest rise of the out-of-vocabulary word "
                                    "share over the reference's own (held-out episodes), before 'vocabulary: shifted'.")
    max_length_shift: float = Field(1.0, ge=0, le=100, description="Largest change of the mean message length, in "
                                    "standard deviations of the reference's lengths, before 'length: shifted'.")
    max_thumbs_down_rate: float = Field(0.3, ge=0, le=1, description="Largest share of rated turns rated -1.")
    min_ratings: int = Field(10, ge=1, description="Fewest rated turns before the thumbs-down rate is judged.")
    max_error_rate: float = Field(0.02, ge=0, le=1, description="Largest share of turns that ended in an error.")
    max_cancelled_rate: float = Field(0.2, ge=0, le=1, description="Largest share of turns cancelled by the client.")
    max_latency_p95_s: float = Field(10.0, gt=0, description="Largest 95th percentile of the reply latency, seconds.")
    max_repeat3_rate: float = Field(0.5, ge=0, le=1, description="Largest share of replies repeating a word 3-gram.")
    max_empty_rate: float = Field(0.1, ge=0, le=1, description="Largest share of empty (no letter or digit) replies.")
    max_tokens_rate: float = Field(0.5, ge=0, le=1, description="Largest share of replies cut at max_new_tokens.")
    max_template_leak_rate: float = Field(0.05, ge=0, le=1, description="Largest share of replies holding template "
                                          "or role tokens.")
    min_likeness: float | None = Field(None, description="Least character likeness of the served replies (style "
                                       "classifier rebuilt from the reference; 0: like other speakers, 1: like the "
                                       "character). None: reported, not judged.")
    seed: int = Field(0, description="Seed of the samples and the permutations.")


class PipelineConfig(Strict):
    data: DataConfig
    character: str = Field(..., min_length=1, description="Speaker whose lines the bot learns to say.")
    show: str | None = Field(None, description="Name of the show, for the chat format's system line "
                             "('You are Rick from Rick and Morty.').")
    base_model: str = Field(
        "offline-tiny", description="'smollm2-135m' (SmolLM2-135M-Instruct from the package index, verified and cached), "
        "'offline-tiny' (a tiny model built from the training text, for tests), a Hugging Face id or a local folder.",
    )
    offline_model: OfflineModelConfig = Field(default_factory=OfflineModelConfig, description="Shape of offline-tiny.")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="Data quality thresholds.")
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig, description="How the transcript is cleaned.")
    dialogue: DialogueConfig = Field(default_factory=DialogueConfig, description="How samples are built and split.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Fine-tuning settings.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="How replies are judged.")
    gate: GateConfig = Field(default_factory=GateConfig, description="When a candidate becomes champion.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="MLflow registry and Bento.")
    monitor: MonitorConfig = Field(default_factory=MonitorConfig, description="Drift and health checks of the "
                                   "served bot (flows/monitor.py); not part of the training digest.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Hyper-parameter study (python -m flows.tune).")

    @model_validator(mode="after")
    def _space_fits_profile(self):
        problems = search_space_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def search_space(self) -> dict[str, SearchRange]:
        """tune.space, or the default space for this profile's training method."""
        return self.tune.space if self.tune.space is not None else default_space(self.training, self.dialogue)

    @property
    def model_name(self) -> str:
        return self.registry.model_name or f"{self.character.lower().replace(' ', '-')}-bot"

    def digest(self) -> str:
        """sha256 of the resolved training config: the same settings give the same hash. The monitor's thresholds
        and the tune: section are left out: they change nothing a training run does (and champions registered before
        they existed keep their hash)."""
        settings = self.model_dump(mode="json", exclude={"monitor", "tune"})
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def search_space_problems(config: PipelineConfig) -> list[str]:
    """What in tune.space / tune.enqueue cannot work with this profile, each naming its key."""
    space, training = config.search_space(), config.training
    problems = []
    if "training.epochs" in space and training.max_steps > 0 and "training.max_steps" not in space:
        problems.append(f"tune.space.training.epochs: training.max_steps is {training.max_steps}, which overrides "
                        "epochs; search training.max_steps instead, or set training.max_steps: -1")
    if training.method == "full" and "training.method" not in space:
        problems += [f"tune.space.{key}: LoRA settings do nothing with training.method full"
                     for key in space if key.startswith("training.lora.")]
    if config.dialogue.loss_on == "all":
        problems += [f"tune.space.{key}: with dialogue.loss_on all the validation loss counts context tokens, so "
                     "trials with other contexts would not compare" for key in space
                     if key in ("dialogue.context_turns", "dialogue.max_length")]
    steps = space.get("training.max_steps")
    if steps is not None and min(steps.values()) < training.eval_steps:
        problems.append(f"tune.space.training.max_steps: {min(steps.values())} steps end before the first validation "
                        f"(training.eval_steps {training.eval_steps}): the trial would have no loss to compare")
    for i, settings in enumerate(config.tune.enqueue):
        for key, value in settings.items():
            spec = space.get(key)
            if spec is None:
                problems.append(f"tune.enqueue[{i}].{key}: not in the search space ({', '.join(space)})")
            elif not (value in spec.choices if spec.type == "categorical"
                      else isinstance(value, (int, float)) and spec.low <= value <= spec.high):
                problems.append(f"tune.enqueue[{i}].{key}: {value!r} lies outside its search range")
    return problems


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
