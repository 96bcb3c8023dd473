"""Held-out perplexity: exp(total token loss / total target tokens) over non-padding labels."""

import hashlib

from prefect import task
from prefect.cache_policies import NO_CACHE

from castbot.model.bot import exp_mean
from castbot.config import PipelineConfig
from castbot.model.dialogue import DialogueFormat
from castbot.scores.quality import perplexity_ci, pooled_perplexity


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary and merges: equal fingerprints make per-token perplexities comparable."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


_ENCODED: dict[tuple, list[dict]] = {}  # the last test split's encoding, per tokenizer and format


def encode_samples(bot, samples: list[dict], max_length: int) -> list[dict]:
    """The samples encoded for the Bot; a model with the same tokenizer and format (candidate, base, champion
    of one run) reuses the encoding instead of tokenising the split again."""
    import json

    key = (tokenizer_fingerprint(bot.tokenizer), getattr(bot.tokenizer, "chat_template", None), bot.format, max_length,
           hashlib.sha256(json.dumps(samples, sort_keys=True).encode()).hexdigest())
    if key not in _ENCODED:
        _ENCODED.clear()
        _ENCODED[key] = [bot.encode(s, max_length) for s in samples]
    return _ENCODED[key]


def measure_perplexity(bot, samples: list[dict], max_length: int) -> dict:
    """Perplexity of a loaded Bot on the samples' responses, in its own tokenizer and dialogue format.

    Also per word and per character (exp(total loss / words or characters)), which compare models whose
    tokenizers differ; per-sample sums are kept for paired comparisons.
    """
    losses = bot.score(encode_samples(bot, samples, max_length))
    total_loss, tokens = sum(loss for loss, _ in losses), sum(n for _, n in losses)
    chars = sum(len(s["response"].strip()) + 1 for s in samples)  # + 1: the end-of-turn token
    words = sum(len(s["response"].split()) for s in samples)
    interval = perplexity_ci([loss for loss, _ in losses], [n for _, n in losses], [s["episode"] for s in samples],
                             seed=0) if tokens else {"low": float("nan"), "high": float("nan")}
    return {"perplexity": pooled_perplexity(losses), "tokens": tokens, "loss": total_loss / max(tokens, 1),
            "perplexity_low": interval["low"], "perplexity_high": interval["high"],  # 95%, bootstrap over episodes
            "total_loss": total_loss, "char_perplexity": exp_mean(total_loss, chars) if tokens else float("nan"),
            "word_perplexity": exp_mean(total_loss, words) if tokens else float("nan"),
            "sample_losses": [loss for loss, _ in losses], "sample_tokens": [n for _, n in losses],
            "sample_chars": [len(s["response"].strip()) + 1 for s in samples],
            "sample_episodes": [s["episode"] for s in samples],
            "format": bot.format.style, "tokenizer": tokenizer_fingerprint(bot.tokenizer)}


@task(name="log_scores", retries=2, retry_delay_seconds=2)
def log_scores(run_id: str, scores: dict[str, dict | None]) -> None:
    """Every finite figure as an MLflow metric test_<figure>_<model>, e.g. test_perplexity_candidate."""
    import math
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)  # ms
    metrics = [Metric(f"test_{key}_{name}", float(value), now, 0) for name, score in scores.items() if score
               for key, value in score.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]
    metrics.append(Metric("test_target_tokens", float(scores["candidate"]["tokens"]), now, 0))
    MlflowClient().log_batch(run_id, metrics=metrics)


@task(name="evaluate_model", cache_policy=NO_CACHE)
def evaluate_model(model_path: str, samples: list[dict], config: PipelineConfig, judge,
                   fmt: DialogueFormat | None = None) -> dict:
    """Test perplexity (with its interval and per-sample losses) and the judged replies of one model, loaded once
    (fmt for a base model that has no castbot.json)."""
    from castbot.model.bot import Bot
    from tasks.evaluate.judge import judge_replies

    max_length = config.dialogue.max_length
    bot = Bot.load(model_path, fmt=fmt, max_length=max_length)
    return {**measure_perplexity(bot, samples, max_length),
            **judge_replies(bot, judge, config.evaluation, max_length)}
