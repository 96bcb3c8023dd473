"""Liked served turns (data.feedback) as extra training samples, read from the conversation log.

A turn becomes a sample only when its user liked it (last rating +1), its reply is complete, and, with
data.feedback.require_review (default true), a person approved it (python -m castbot.chatlog review). The sample
keeps the history that produced the reply as its context lines (the last dialogue.context_turns, as transcript
samples). Its lines go through the transcript's line rules (tasks/data/line_rules.py, as the profile's cleaning
section sets them) and the dialogue suite's limits (validation.max_line_chars, validation.max_markup_share); the
same context and reply count once; a held-out reply is left out; and the samples are capped at
data.feedback.max_share of the training split they join. The run logs the samples it trained on as feedback.jsonl.

A turn trains the character who said it (the log's `character`): a cast model's turn becomes a sample of that
member (its system line names them), capped at max_share of that member's training samples; a turn of someone the
profile does not learn (another character, or a member no longer in the cast) is left out.
"""

import hashlib
import json
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from castbot.chatlog.schema import COMPLETE
from castbot.common.logs import run_logger
from castbot.config.data import CleaningConfig, ValidationConfig
from castbot.config.profile import PipelineConfig
from tasks.data.line_rules import LEFTOVER_MARKUP, clean_lines


def _line(text: str) -> str:
    """NBSP, tabs, newlines and runs of spaces to one space (a newline + 'Name:' cannot pass as another line)."""
    return re.sub(r"\s+", " ", text).strip()


def cleaned_texts(liked: pd.DataFrame, rules: CleaningConfig) -> dict[str, str]:
    """Each distinct message, reply and history text of the liked turns -> that text after the transcript's line
    rules, then on one line whatever cleaning.normalize_whitespace says (the guard above)."""
    texts = sorted({*liked["message"].astype(str), *liked["reply"].astype(str),
                    *(str(text) for history in liked["history"] for _, text in history)})
    return dict(zip(texts, map(_line, clean_lines(texts, rules)), strict=True))


def liked_samples(turns: pd.DataFrame, require_review: bool = True, context_turns: int | None = None,
                  cleaning: CleaningConfig | None = None, cast: bool = False) -> list[dict]:
    """One sample per liked, complete (and, with require_review, approved) turn, oldest first, each context and
    reply once: context = the history then the user's message, cleaned by `cleaning` (default: the default rules);
    `turn_id` and `client` mark it as feedback; a cast model's sample names the member who spoke. A reply the
    rules leave empty is dropped, as the cleaning step drops a transcript row left empty."""
    liked = turns[(turns["rating"] == 1) & turns["finish_reason"].isin(COMPLETE)]
    if require_review:
        liked = liked[liked["review"] == "approved"]
    text = cleaned_texts(liked, cleaning or CleaningConfig())
    samples, seen = [], set()
    for row in liked.itertuples(index=False):
        context = [(speaker, text[str(said)]) for speaker, said in [*row.history, ("", row.message)]
                   if text[str(said)]]
        if context_turns is not None:
            context = context[-max(context_turns, 1):]  # always the message itself
        response = text[str(row.reply)]
        sample = {"episode": f"feedback:{row.conversation_id}", "context": [line for _, line in context],
                  "speakers": [speaker for speaker, _ in context], "response": response,
                  "turn_id": row.turn_id, "client": row.client,
                  **({"character": row.character} if cast else {})}  # a cast: the member who said it
        key = (tuple(sample["context"]), response)
        if response and context and key not in seen:
            seen.add(key)
            samples.append(sample)
    return samples


def learnt_speakers(turns: pd.DataFrame, config: PipelineConfig) -> pd.Series:
    """Which turns were said by a character the profile learns: its character, or a member of its cast list; every
    turn for cast {top: N}, whose members merge_feedback checks once the transcript has named them."""
    if config.character is not None:
        return turns["character"] == config.character
    if isinstance(config.cast, list):
        return turns["character"].isin(config.cast)
    return pd.Series(True, index=turns.index)


def refused(sample: dict, rules: ValidationConfig) -> bool:
    """Whether the dialogue suite's limits (tasks/data/validate.py) refuse the sample's lines: one longer than
    validation.max_line_chars, or a larger share than validation.max_markup_share still holding markup."""
    lines = [*sample["context"], sample["response"]]
    markup = sum(bool(re.search(LEFTOVER_MARKUP, line)) for line in lines)
    return any(len(line) > rules.max_line_chars for line in lines) or markup / len(lines) > rules.max_markup_share


def awaiting_review(turns: pd.DataFrame) -> int:
    """Liked, complete turns that no one has approved or rejected yet."""
    return int(((turns["rating"] == 1) & turns["finish_reason"].isin(COMPLETE) & (turns["review"] == "pending")).sum())


def feedback_cap(train_size: int, max_share: float) -> int:
    """Most feedback samples a split of `train_size` transcript samples takes so that they are at most `max_share`
    of the training split they join: n <= max_share * (train_size + n)."""
    if max_share >= 1:
        return 2**31
    return int(max_share * train_size / (1 - max_share) + 1e-9)


def feedback_samples(train: list[dict]) -> list[dict]:
    """The samples of a training split that came from the conversation log."""
    return [s for s in train if "turn_id" in s]


def feedback_digest(samples: list[dict]) -> str:
    """Content hash of feedback samples (turn ids, contexts, replies; order-free), 16 hex digits."""
    rows = sorted([s["turn_id"], s["context"], s["response"]] for s in samples)
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()[:16]


def write_feedback_jsonl(samples: list[dict], folder: str | Path) -> Path:
    """The feedback samples a run trained on as folder/feedback.jsonl (one sample a line: turn_id, client,
    context, speakers, response, and a cast's character), for the run's artifacts: a model's lineage names the users'
    words it learned, and whose lines they became."""
    path = Path(folder) / "feedback.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ("turn_id", "client", "episode", "context", "speakers", "response")
    with path.open("w", encoding="utf-8") as out:
        for sample in samples:
            row = {k: sample.get(k) for k in keys} | ({"character": sample["character"]} if "character" in sample
                                                       else {})
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


@dataclass
class FeedbackFound:
    """What the log holds for training: the samples, the liked turns still awaiting review, and the approved
    samples the validation limits refused."""

    samples: list[dict] = field(default_factory=list)
    pending: int = 0
    refused: int = 0
    other_speakers: int = 0  # trainable samples of a character the profile does not learn


def read_feedback(config: PipelineConfig) -> FeedbackFound:
    """The bot's trainable liked turns in the conversation log that data.feedback names, cleaned and checked by
    the profile's rules, and how many await review."""
    from castbot.chatlog.store import ChatLog, default_url

    settings = config.data.feedback
    since = datetime.now(UTC) - timedelta(days=settings.since_days) if settings.since_days else None
    log = ChatLog(settings.url or default_url())
    try:
        turns = log.turns(model_name=settings.model_name or config.model_name, since=since)
    finally:
        log.close()
    learnt = learnt_speakers(turns, config)
    others = liked_samples(turns[~learnt], settings.require_review, config.dialogue.context_turns, config.cleaning)
    turns = turns[learnt]
    samples = liked_samples(turns, settings.require_review, config.dialogue.context_turns, config.cleaning,
                            cast=config.cast is not None)
    kept = [sample for sample in samples if not refused(sample, config.validation)]
    return FeedbackFound(kept, awaiting_review(turns) if settings.require_review else 0, len(samples) - len(kept),
                         len(others))


def read_liked_samples(config: PipelineConfig) -> list[dict]:
    """The samples read_feedback finds (what the schedule's freshness key hashes: a like alone is not new data
    while it awaits review)."""
    return read_feedback(config).samples


@dataclass
class FeedbackAdded:
    """The splits with feedback in training, and the counts the flow reports."""

    splits: dict[str, list[dict]]
    added: int = 0  # samples added to training
    pending: int = 0  # liked turns awaiting review (python -m castbot.chatlog review)
    held_out: int = 0  # left out: the reply is a validation or test response
    over_cap: int = 0  # left out: beyond data.feedback.max_share of the training split (a cast's: of the member's)
    refused: int = 0  # left out: over the validation limits once cleaned
    other_speakers: int = 0  # left out: said by a character the profile does not learn (summary only, no param)

    def counts(self) -> dict[str, int]:
        return {"added": self.added, "pending": self.pending, "held_out": self.held_out, "over_cap": self.over_cap,
                "refused": self.refused}

    def summary(self) -> str:
        return (f"{self.added} feedback samples added to training, {self.pending} liked turns await review "
                f"(python -m castbot.chatlog review); left out: {self.held_out} held-out replies, {self.over_cap} "
                f"over the max_share cap, {self.refused} refused by the validation limits"
                + (f", {self.other_speakers} said by characters this profile does not learn"
                   if self.other_speakers else ""))


def newest_within(samples: list[dict], train: list[dict], max_share: float) -> list[dict]:
    """The newest samples (they come oldest first) within the cap of the training split; a cast's within the cap
    of each member's training samples, so one member's likes cannot drown that member's lines."""
    def newest(mine: list, size: int) -> list:
        cap = feedback_cap(size, max_share)
        return mine[-cap:] if cap else []

    if not any("character" in s for s in train):
        return newest(samples, len(train))
    lines = Counter(s["character"] for s in train)  # each member's training samples
    kept = set()
    for member in dict.fromkeys(s["character"] for s in samples):
        kept.update(newest([i for i, s in enumerate(samples) if s["character"] == member], lines[member]))
    return [s for i, s in enumerate(samples) if i in kept]


def merge_feedback(splits: dict[str, list[dict]], found: FeedbackFound, max_share: float) -> FeedbackAdded:
    """Add the found samples to training: a cast's sample of someone not in the cast (as the transcript resolved
    it) is left out, so is a reply that is also a held-out response (training on it would leak the test set), then
    the newest samples up to the cap are kept."""
    members = {s["character"] for split in splits.values() for s in split if "character" in s}
    ours = [s for s in found.samples if not members or s.get("character") in members]
    held_out = {s["response"].strip() for name in ("validation", "test") for s in splits[name]}
    kept = [s for s in ours if s["response"].strip() not in held_out]
    capped = newest_within(kept, splits["train"], max_share)
    return FeedbackAdded({**splits, "train": splits["train"] + capped}, added=len(capped), pending=found.pending,
                         held_out=len(ours) - len(kept), over_cap=len(kept) - len(capped), refused=found.refused,
                         other_speakers=found.other_speakers + len(found.samples) - len(ours))


@task(name="add_approved_feedback", cache_policy=NO_CACHE)  # the log changes between runs: always read it
def add_approved_feedback(splits: dict[str, list[dict]], config: PipelineConfig,
                          found: FeedbackFound | None = None) -> FeedbackAdded:
    """With data.feedback.enabled, the splits with the bot's approved liked turns added to training only, and the
    counts; else the splits unchanged. found: read_feedback(config) as the flow read it (None: read here)."""
    from castbot.chatlog.settings import safe_url

    settings = config.data.feedback
    if not settings.enabled:
        return FeedbackAdded(splits)
    added = merge_feedback(splits, read_feedback(config) if found is None else found, settings.max_share)
    where = f" from {safe_url(settings.url)}" if settings.url else ""  # the password masked (user:***@host)
    run_logger("castbot.feedback").info("data.feedback (%s%s): %s", settings.model_name or config.model_name,
                                        where, added.summary())
    return added


@task(name="add_feedback_samples", cache_policy=NO_CACHE)
def add_feedback_samples(splits: dict[str, list[dict]], config: PipelineConfig,
                         liked: list[dict] | None = None) -> dict[str, list[dict]]:
    """add_approved_feedback's splits alone; liked: read_liked_samples(config) as the flow read it (None: read here;
    the count awaiting review is then not reported)."""
    return add_approved_feedback.fn(splits, config, None if liked is None else FeedbackFound(liked)).splits


@task(name="log_feedback", retries=2, retry_delay_seconds=2)
def log_feedback(run_id: str, added: FeedbackAdded) -> None:
    """The run's data.feedback counts as MLflow params (feedback.added, feedback.pending, feedback.held_out,
    feedback.over_cap, feedback.refused) and the samples it trains on as the artifact feedback.jsonl (empty when
    none): the users' words a model learned, by turn id and client."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in added.counts().items():
        client.log_param(run_id, f"feedback.{key}", value)
    with tempfile.TemporaryDirectory() as folder:
        client.log_artifact(run_id, str(write_feedback_jsonl(feedback_samples(added.splits["train"]), folder)))
