"""Liked served turns (data.feedback) as extra training samples, read from the conversation log."""

import hashlib
import json
from datetime import datetime, timedelta, timezone

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from castbot.config import PipelineConfig
from castbot.common.logs import run_logger

# a reply cut short by the client or an error is not the reply the user rated: never train on it
COMPLETE = ("stop", "length")


def liked_samples(turns: pd.DataFrame) -> list[dict]:
    """One sample per liked (last rating +1), complete turn: context = the user's message, response = the reply.

    The log keeps only the last message of a turn (and a count of the earlier ones), so the context is that one
    line, spoken by the unnamed user as in the service. `turn_id` marks the sample as feedback in the lineage."""
    liked = turns[(turns["rating"] == 1) & turns["finish_reason"].isin(COMPLETE)
                  & turns["reply"].str.strip().astype(bool)]
    return [{"episode": f"feedback:{row.conversation_id}", "context": [row.message], "speakers": [""],
             "response": row.reply, "turn_id": row.turn_id} for row in liked.itertuples(index=False)]


def feedback_samples(train: list[dict]) -> list[dict]:
    """The samples of a training split that came from the conversation log."""
    return [s for s in train if "turn_id" in s]


def feedback_digest(samples: list[dict]) -> str:
    """Content hash of feedback samples (turn ids, messages, replies; order-free), 16 hex digits."""
    rows = sorted([s["turn_id"], s["context"], s["response"]] for s in samples)
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()[:16]


def read_liked_samples(config: PipelineConfig) -> list[dict]:
    """The bot's liked turns in the conversation log that data.feedback names, as training samples."""
    from castbot.chatlog.store import ChatLog, default_url

    settings = config.data.feedback
    since = datetime.now(timezone.utc) - timedelta(days=settings.since_days) if settings.since_days else None
    log = ChatLog(settings.url or default_url())
    try:
        return liked_samples(log.turns(model_name=settings.model_name or config.model_name, since=since))
    finally:
        log.close()


@task(name="add_feedback_samples", cache_policy=NO_CACHE)  # the log changes between runs: always read it
def add_feedback_samples(splits: dict[str, list[dict]], config: PipelineConfig) -> dict[str, list[dict]]:
    """With data.feedback.enabled, the splits with the bot's liked turns added to training only; else unchanged.

    A liked reply that is also a held-out response is left out: training on it would leak the test set."""
    if not config.data.feedback.enabled:
        return splits
    model_name = config.data.feedback.model_name or config.model_name
    samples = read_liked_samples(config)
    held_out = {s["response"].strip() for name in ("validation", "test") for s in splits[name]}
    kept = [s for s in samples if s["response"].strip() not in held_out]
    run_logger("castbot.feedback").info(
        "data.feedback: %d liked turns of %s added to training (%d left out: a held-out reply)",
        len(kept), model_name, len(samples) - len(kept))
    return {**splits, "train": splits["train"] + kept}
