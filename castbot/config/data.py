"""The data sections of a profile: where the transcript is, how it is checked and cleaned, how samples are built."""

import re
from typing import Literal

from pydantic import Field, model_validator

from castbot.config.base import Strict


class ColumnMap(Strict):
    episode: str = Field("episode", description="Source column holding the episode (or film, or conversation) id.")
    speaker: str = Field("speaker", description="Source column holding the speaker's name.")
    line: str = Field("line", description="Source column holding the spoken text.")
    scene: str | None = Field(None, description="Optional source column holding the scene id within an episode.")
    season: str | None = Field(
        None, description="Optional source column holding the season, when episode numbers restart every season."
    )


class FeedbackConfig(Strict):
    """Served turns that users liked, from the conversation log (castbot/chatlog/store.py), as extra training
    samples."""

    enabled: bool = Field(False, description="Add the log's liked turns (thumbs up; never thumbs down or unrated) of "
                          "this bot to the training split as history + message -> reply samples, cleaned and "
                          "checked by the transcript's rules. Validation and test stay the transcript's, so the gate "
                          "still decides on the same held-out episodes.")
    url: str | None = Field(None, description="SQLAlchemy URL of the conversation log; default CASTBOT_CHATLOG_URL, "
                            "else chatlog.db under CASTBOT_HOME. Prefer the environment for a URL with a password: "
                            "MLflow params and config.yaml show it masked (user:***@host).")
    model_name: str | None = Field(None, min_length=1, description="Registered model whose liked turns are used; "
                                   "default this profile's model name (registry.model_name or '<character>-bot').")
    since_days: int | None = Field(None, ge=1, le=3650, description="Only turns of the last N days; None: all.")
    require_review: bool = Field(True, description="Train on a liked turn only once a person approved it "
                                 "(python -m castbot.chatlog review --approve TURN_ID): a client can steer a reply "
                                 "with a made-up history and like it. false: every liked turn trains (a closed "
                                 "test bot only).")
    max_share: float = Field(0.2, ge=0, le=1, description="Largest share of the training split that feedback "
                             "samples may make up (0.2: at most 1 in 5; a cast: of each member's samples); the newest "
                             "approved turns are kept. 0: none.")


class DataConfig(Strict):
    path: str = Field(
        ...,
        description="Transcript file (.csv, .jsonl, .parquet), relative to the profile's folder, "
        "or 'chatterbot:LANGUAGE' for the corpus shipped with chatterbot-corpus.",
    )
    columns: ColumnMap = Field(default_factory=ColumnMap,
                               description="Which source columns hold episode, speaker, line.")
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
        "auto", description="How turns become tokens (castbot/model/dialogue.py): chat = the model's chat template "
        "with a system line naming the character; eos = DialoGPT's turns joined by <eos>; auto = chat when the "
        "tokenizer has a chat template.",
    )
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of episodes held out for validation.")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of episodes held out for the perplexity test.")
