"""Judge a bot by what it says: replies to held-out contexts, scored for character, fluency and degeneracy.

The same contexts, seed and decoding (the service's defaults) for the candidate, the base and the champion.
"""

import random
from dataclasses import dataclass, field

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from castbot.config import EvaluationConfig, PipelineConfig
from castbot.model.dialogue import DECODING_DEFAULTS, DialogueFormat, sample_turns
from castbot.common.logs import run_logger
from castbot.scores.quality import CharacterClassifier, degeneracy, likeness, train_character_classifier

REPLY_BATCH = 16  # contexts per generate() call


@dataclass
class Judge:
    """What every model is judged against: the style classifier, its anchors and the contexts to answer."""

    classifier: CharacterClassifier | None  # None: too few lines to train one (no likeness figure)
    character_lines: list[str]  # real held-out lines of the character: likeness 1
    other_lines: list[str]  # real held-out lines of everyone else: likeness 0
    real_lines: list[str]  # the character's training lines: how varied real replies are
    contexts: list[dict]  # test samples the models answer
    reference: str  # model folder whose perplexity of a reply measures fluency
    reference_format: DialogueFormat
    reference_bot: object = field(default=None, repr=False)  # loaded on first use, shared by every judged model


def speaker_lines(frame: pd.DataFrame, episodes: set[str]) -> list[tuple[str, str]]:
    """(speaker, line) of every row in the given episodes."""
    rows = frame[frame["episode"].astype(str).isin(episodes)]
    return list(zip(rows["speaker"], rows["line"]))


@task(name="build_judge", cache_policy=NO_CACHE)
def build_judge(cleaned: pd.DataFrame, splits: dict[str, list[dict]], config: PipelineConfig, base: str,
                fmt: DialogueFormat) -> Judge:
    """Train the style classifier on the training episodes; anchors from the held-out ones; pick the contexts.
    Fluency is judged by evaluation.reference_model, else by the untuned base in the training format."""
    from castbot.model.pretrained import resolve
    from tasks.data.tokenize import choose_format

    character, evaluation = config.character, config.evaluation
    reference, reference_format = base, fmt
    if evaluation.reference_model:
        reference = resolve(evaluation.reference_model)
        reference_format = choose_format(reference, config.dialogue, character, config.show)
    train = speaker_lines(cleaned, {s["episode"] for s in splits["train"]})
    held_out = speaker_lines(cleaned, {s["episode"] for name in ("validation", "test") for s in splits[name]})
    log = run_logger("castbot.judge")
    try:
        classifier = train_character_classifier(train, character, evaluation.seed)
        log.info("style classifier on %d training lines: held-out accuracy %.2f, balanced %.2f, AUC %.2f (%.1f s)",
                 len(train), classifier.heldout_accuracy, classifier.heldout_balanced_accuracy,
                 classifier.heldout_auc, classifier.train_seconds)
    except ValueError as exc:  # a tiny transcript: judge the rest, and a gate on likeness refuses (no figure)
        log.warning("no style classifier: %s", exc)
        classifier = None
    test = splits["test"]
    contexts = random.Random(evaluation.seed).sample(test, min(evaluation.replies, len(test)))
    return Judge(classifier, [t for s, t in held_out if s == character], [t for s, t in held_out if s != character],
                 [t for s, t in train if s == character], contexts, reference, reference_format)


def generate_replies(bot, contexts: list[dict], seed: int) -> list:
    """One reply per context with the service's decoding defaults, REPLY_BATCH contexts per generate() call."""
    import torch

    torch.manual_seed(seed)
    replies = []
    for start in range(0, len(contexts), REPLY_BATCH):
        replies += bot.generate([sample_turns(s) for s in contexts[start:start + REPLY_BATCH]], **DECODING_DEFAULTS)
    return replies


def reply_perplexity(judge: Judge, replies: list[str], max_length: int) -> float:
    """Perplexity per token of the non-empty replies under the reference model, each given its context."""
    from castbot.model.bot import Bot
    from castbot.scores.quality import pooled_perplexity

    if judge.reference_bot is None:
        judge.reference_bot = Bot.load(judge.reference, fmt=judge.reference_format, max_length=max_length)
    reference = judge.reference_bot
    samples = [{**context, "response": reply} for context, reply in zip(judge.contexts, replies) if reply.strip()]
    losses = reference.score([reference.encode(s, max_length) for s in samples])
    return pooled_perplexity(losses)


def judge_replies(bot, judge: Judge, evaluation: EvaluationConfig, max_length: int) -> dict:
    """A loaded Bot's replies to the judge's contexts, with likeness, fluency and degeneracy figures."""
    if not judge.contexts:
        return {}
    generated = generate_replies(bot, judge.contexts, evaluation.seed)
    texts = [g.reply for g in generated]
    last_turns = [s["context"][-1] if s["context"] else "" for s in judge.contexts]
    figures = {"replies": texts, "likeness": float("nan"), "reply_perplexity": reply_perplexity(judge, texts, max_length)}
    # too few lines for a figure: likeness stays nan (a gate on it refuses), degeneracy is left out, no crash
    try:
        if judge.classifier is not None:
            figures |= likeness(judge.classifier, texts, judge.character_lines, judge.other_lines)
            figures["likeness_classifier_auc"] = judge.classifier.heldout_auc
    except ValueError as exc:
        run_logger("castbot.judge").warning("no character likeness: %s", exc)
    try:
        figures |= degeneracy(texts, last_turns, judge.real_lines, [g.hit_max_tokens for g in generated])
    except ValueError as exc:
        run_logger("castbot.judge").warning("no degeneracy figures: %s", exc)
    return figures


@task(name="publish_replies", retries=2, retry_delay_seconds=2)
def publish_replies(judge: Judge, scores: dict[str, dict | None], run_id: str) -> str:
    """Side-by-side replies of base, champion and candidate as MLflow text (replies.md); returns the markdown
    for the gate's Prefect artifact."""
    from mlflow import MlflowClient

    from castbot.scores.quality import side_by_side_markdown

    contexts = [[f"{s}: {t}" if s else t for s, t in sample_turns(sample)] for sample in judge.contexts]
    replies = {name: scores[name]["replies"] for name in ("base", "champion", "candidate")
               if scores.get(name) and "replies" in scores[name]}
    markdown = "### Replies to held-out contexts\n\n" + side_by_side_markdown(contexts, replies)
    MlflowClient().log_text(run_id, markdown, "replies.md")
    return markdown
