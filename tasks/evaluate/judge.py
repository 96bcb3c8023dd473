"""Judge a bot by what it says: replies to held-out contexts, scored for character, fluency and degeneracy.

The same contexts, seed and decoding (the service's defaults) for the candidate, the base and the champion. A cast
model answers each context as the member who spoke it, and an attribution classifier says whom each reply sounds
like (instead of the one character's likeness).
"""

import copy
import math
import random
from dataclasses import dataclass, replace

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from castbot.common.logs import run_logger
from castbot.config.profile import PipelineConfig, characters
from castbot.model.bot import Bot, Reply
from castbot.model.dialogue import DECODING_DEFAULTS, Turn
from castbot.scores.quality import (
    CastClassifier,
    CharacterClassifier,
    attribution,
    degeneracy,
    likeness,
    train_cast_classifier,
    train_character_classifier,
)
from tasks.evaluate.scores import Replies, Sample, ScoreSet

REPLY_BATCH = 16  # contexts per generate() call


@dataclass(frozen=True)
class Judge:
    """What every model is judged against: the style classifier, its anchors, the contexts to answer, and the
    reference model whose perplexity of a reply measures fluency. Built once per run, before any model is judged."""

    classifier: CharacterClassifier | None  # None: too few lines to train one (no likeness figure)
    character_lines: list[str]  # real held-out lines of the character: likeness 1
    other_lines: list[str]  # real held-out lines of everyone else: likeness 0
    real_lines: list[str]  # the character's training lines: how varied real replies are
    contexts: list[Sample]  # test samples the models answer
    reference: Bot  # evaluation.reference_model, else the untuned base in the training format
    max_length: int  # tokens of a context and its reply, as the test split is encoded
    seed: int  # of the sampled replies: every model answers with the same draws
    cast: tuple[str, ...] = ()  # a cast model: its members; () for one character
    attributor: CastClassifier | None = None  # a cast model: whom a line sounds like (None: too few lines)


def speaker_lines(frame: pd.DataFrame, episodes: set[str]) -> list[tuple[str, str]]:
    """(speaker, line) of every row in the given episodes."""
    rows = frame[frame["episode"].astype(str).isin(episodes)]
    return list(zip(rows["speaker"], rows["line"]))


def reference_bot(config: PipelineConfig, base: Bot) -> Bot:
    """The model that judges fluency: evaluation.reference_model (in its own format), else the base as loaded."""
    from castbot.model.pretrained import resolve
    from tasks.data.tokenize import choose_format

    if not config.evaluation.reference_model:
        return base
    folder = resolve(config.evaluation.reference_model)
    fmt = choose_format(folder, config.dialogue, base.format.character, config.show)  # a cast: its first member
    return Bot.load(folder, fmt=fmt, max_length=config.dialogue.max_length)


@task(name="build_judge", cache_policy=NO_CACHE)
def build_judge(cleaned: pd.DataFrame, splits: dict[str, list[dict]], config: PipelineConfig, base: Bot) -> Judge:
    """Train the style classifier on the training episodes; anchors from the held-out ones; pick the contexts.
    Fluency is judged by evaluation.reference_model, else by the untuned base (base: loaded in the training format).
    A cast: the attribution classifier instead, and the contexts spread evenly over its members."""
    if config.cast is not None:
        return build_cast_judge(cleaned, splits, config, base)
    character, evaluation = config.character, config.evaluation
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
                 [t for s, t in train if s == character], [Sample.of(s) for s in contexts],
                 reference_bot(config, base), config.dialogue.max_length, evaluation.seed)


def build_cast_judge(cleaned: pd.DataFrame, splits: dict[str, list[dict]], config: PipelineConfig,
                     base: Bot) -> Judge:
    """A cast's judge: the attribution classifier on the cast's training lines, and evaluation.replies test
    contexts in all, spread evenly over the members (seeded; fewer for a member with fewer test samples)."""
    cast, evaluation = characters(config, cleaned), config.evaluation
    train = speaker_lines(cleaned, {s["episode"] for s in splits["train"]})
    log = run_logger("castbot.judge")
    try:
        attributor = train_cast_classifier(train, cast, evaluation.seed)
        log.info("attribution classifier on %d training lines of %d members: held-out accuracy %.2f, balanced %.2f "
                 "(chance %.2f; %.1f s)", sum(s in cast for s, _ in train), len(cast), attributor.heldout_accuracy,
                 attributor.heldout_balanced_accuracy, 1 / len(cast), attributor.train_seconds)
    except ValueError as exc:
        log.warning("no attribution classifier: %s", exc)
        attributor = None
    rng, each = random.Random(evaluation.seed), math.ceil(evaluation.replies / len(cast))
    contexts = []
    for name in cast:
        spoken = [s for s in splits["test"] if s["character"] == name]
        contexts += rng.sample(spoken, min(each, len(spoken)))
    return Judge(None, [], [], [t for s, t in train if s in cast], [Sample.of(s) for s in contexts],
                 reference_bot(config, base), config.dialogue.max_length, evaluation.seed, tuple(cast), attributor)


def as_character(bot: Bot, character: str) -> Bot:
    """The same loaded model prompted as another cast member (its weights are shared, not copied)."""
    speaking = copy.copy(bot)
    speaking.format = bot.format.speaking(character)
    return speaking


def generate_replies(bot: Bot, conversations: list[list[Turn]], seed: int) -> list[Reply]:
    """One reply per conversation with the service's decoding defaults, REPLY_BATCH conversations per generate()
    call; seeded, so a rerun gives the same text."""
    import torch

    torch.manual_seed(seed)
    replies = []
    for start in range(0, len(conversations), REPLY_BATCH):
        replies += bot.generate(conversations[start:start + REPLY_BATCH], **DECODING_DEFAULTS)
    return replies


def reply_perplexity(judge: Judge, replies: list[str]) -> float:
    """Perplexity per token of the non-empty replies under the reference model, each given its context."""
    from castbot.scores.quality import pooled_perplexity

    reference = judge.reference
    samples = [replace(context, response=reply) for context, reply in zip(judge.contexts, replies) if reply.strip()]
    return pooled_perplexity(reference.score([reference.encode(s.as_dict(), judge.max_length) for s in samples]))


def judge_replies(bot: Bot, judge: Judge) -> Replies | None:
    """A loaded Bot's replies to the judge's contexts, with likeness (a cast: attribution), fluency and degeneracy
    figures; None when there are no contexts to answer."""
    if not judge.contexts:
        return None
    if judge.cast:  # each context answered as the member who spoke it: one generate() call per member
        generated = [None] * len(judge.contexts)
        for name in judge.cast:
            rows = [i for i, s in enumerate(judge.contexts) if s.character == name]
            replies = generate_replies(as_character(bot, name), [judge.contexts[i].turns() for i in rows],
                                       judge.seed) if rows else []
            for i, reply in zip(rows, replies):
                generated[i] = reply
    else:
        generated = generate_replies(bot, [s.turns() for s in judge.contexts], judge.seed)
    texts = [g.reply for g in generated]
    last_turns = [s.context[-1] if s.context else "" for s in judge.contexts]
    figures = {}
    # too few lines for a figure: likeness stays nan (a gate on it refuses), degeneracy is left out, no crash
    try:
        if judge.classifier is not None:
            figures |= likeness(judge.classifier, texts, judge.character_lines, judge.other_lines)
            figures["likeness_classifier_auc"] = judge.classifier.heldout_auc
    except ValueError as exc:
        run_logger("castbot.judge").warning("no character likeness: %s", exc)
    if judge.cast:
        asked = tuple(s.character for s in judge.contexts)
        figures |= {"cast": judge.cast, "speakers": asked}
        if judge.attributor is not None:
            attributed = tuple(judge.attributor.attribute(texts))
            figures |= {"attributed": attributed, **attribution(list(asked), list(attributed), list(judge.cast))}
    try:
        figures |= degeneracy(texts, last_turns, judge.real_lines, [g.hit_max_tokens for g in generated])
    except ValueError as exc:
        run_logger("castbot.judge").warning("no degeneracy figures: %s", exc)
    return Replies(texts, reply_perplexity(judge, texts), **figures)


@task(name="publish_replies", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def publish_replies(judge: Judge, scores: ScoreSet, run_id: str) -> str:
    """Side-by-side replies of base, champion and candidate as MLflow text (replies.md); returns the markdown
    for the gate's Prefect artifact."""
    from mlflow import MlflowClient

    from castbot.scores.quality import side_by_side_markdown

    contexts = [[f"{s}: {t}" if s else t for s, t in sample.turns()] + ([f"(as {sample.character})"]
                if sample.character else []) for sample in judge.contexts]
    named = scores.named()
    replies = {name: named[name].said.texts for name in ("base", "champion", "candidate")
               if name in named and named[name].said is not None}
    markdown = "### Replies to held-out contexts\n\n" + side_by_side_markdown(contexts, replies)
    MlflowClient().log_text(run_id, markdown, "replies.md")
    return markdown
