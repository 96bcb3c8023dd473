"""Held-out perplexity: exp(total token loss / total target tokens) over non-padding labels; the models of a run
loaded once, the test split encoded once, every model's figures logged to MLflow."""

import hashlib

from prefect import task
from prefect.cache_policies import NO_CACHE

from castbot.model.bot import Bot, exp_mean
from castbot.model.dialogue import DialogueFormat
from castbot.scores.quality import perplexity_ci, pooled_perplexity
from tasks.evaluate.scores import CharacterScores, Sample, Scores, ScoreSet


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary and merges: equal fingerprints make per-token perplexities comparable."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def encoding_key(bot) -> tuple:
    """What a Bot's encoding of a sample depends on: its tokenizer, chat template and dialogue format."""
    return tokenizer_fingerprint(bot.tokenizer), getattr(bot.tokenizer, "chat_template", None), bot.format


def encode_samples(bot, samples: list[dict], max_length: int) -> list[dict]:
    """input_ids / attention_mask / labels of each sample in the Bot's tokenizer and format, loss on the response."""
    return [bot.encode(s, max_length) for s in samples]


class EvalSet:
    """A run's test split, encoded once for the Bot it was built with. The candidate and the untuned base share a
    tokenizer and a format, so they score the same rows; a champion with another tokenizer or format is encoded
    again (rows_for).

    A plain class, not a dataclass: Prefect walks every list, dict and dataclass in a task's parameters on each call
    (about 4 s for 3,000 encoded samples of 128 tokens); it passes this object through untouched."""

    __slots__ = ("samples", "max_length", "key", "rows")

    def __init__(self, samples: tuple[Sample, ...], max_length: int, key: tuple, rows: tuple[dict, ...]):
        self.samples = samples
        self.max_length = max_length  # tokens per sample, the oldest context turns dropped first
        self.key = key  # encoding_key of the Bot the rows were encoded for
        self.rows = rows  # input_ids / attention_mask / labels per sample

    def __repr__(self) -> str:
        return f"EvalSet({len(self.samples)} samples, max_length={self.max_length})"

    @classmethod
    def encode(cls, samples: list[dict], bot, max_length: int) -> "EvalSet":
        """The split's samples, typed, and encoded in bot's tokenizer and format."""
        typed = tuple(Sample.of(s) for s in samples)
        return cls(typed, max_length, encoding_key(bot),
                   tuple(encode_samples(bot, [s.as_dict() for s in typed], max_length)))

    def rows_for(self, bot) -> list[dict]:
        """The samples encoded for bot: this set's rows when its tokenizer and format are theirs, else encoded now."""
        if encoding_key(bot) == self.key:
            return list(self.rows)
        return encode_samples(bot, [s.as_dict() for s in self.samples], self.max_length)


@task(name="load_bot", cache_policy=NO_CACHE)
def load_bot(folder: str, max_length: int, fmt: DialogueFormat | None = None) -> Bot:
    """A model folder loaded once per run for its sample replies, evaluation and judging (fmt: the training format,
    for a base model that has no castbot.json)."""
    return Bot.load(folder, fmt=fmt, max_length=max_length)


@task(name="encode_test_split", cache_policy=NO_CACHE)
def encode_test_split(samples: list[dict], bot: Bot, max_length: int) -> EvalSet:
    """The test split encoded in bot's tokenizer and format, once for every model that shares them."""
    return EvalSet.encode(samples, bot, max_length)


def measure_perplexity(bot: Bot, test: EvalSet) -> Scores:
    """Perplexity of a loaded Bot on the samples' responses, in its own tokenizer and dialogue format.

    Also per word and per character (exp(total loss / words or characters)), which compare models whose
    tokenizers differ; per-sample sums are kept for paired comparisons.
    """
    samples = test.samples
    losses = bot.score(test.rows_for(bot))  # (loss sum in nats, target tokens) per sample
    total_loss, tokens = sum(loss for loss, _ in losses), sum(n for _, n in losses)
    chars = [len(s.response.strip()) + 1 for s in samples]  # + 1: the end-of-turn token
    words = sum(len(s.response.split()) for s in samples)
    episodes = [s.episode for s in samples]
    interval = perplexity_ci([loss for loss, _ in losses], [n for _, n in losses], episodes,
                             seed=0) if tokens else {"low": float("nan"), "high": float("nan")}
    return Scores(perplexity=pooled_perplexity(losses), char_perplexity=exp_mean(total_loss, sum(chars))
                  if tokens else float("nan"), tokenizer=tokenizer_fingerprint(bot.tokenizer),
                  word_perplexity=exp_mean(total_loss, words) if tokens else float("nan"),
                  perplexity_low=interval["low"], perplexity_high=interval["high"],  # 95%, bootstrap over episodes
                  tokens=tokens, loss=total_loss / max(tokens, 1), total_loss=total_loss, format=bot.format.style,
                  sample_losses=[loss for loss, _ in losses], sample_tokens=[n for _, n in losses],
                  sample_chars=chars, sample_episodes=episodes,
                  sample_characters=[s.character for s in samples] if samples and samples[0].character else [],
                  characters=character_scores(samples, losses))


def character_scores(samples: tuple[Sample, ...], losses: list[tuple[float, int]]) -> tuple[CharacterScores, ...]:
    """A cast model's perplexity per cast member, over the test samples that member speaks, with the 95% bootstrap
    interval over their episodes (as the whole split's); () for a one-character model's samples."""
    cast = list(dict.fromkeys(s.character for s in samples if s.character))  # first-seen order
    figures = []
    for name in cast:
        rows = [i for i, s in enumerate(samples) if s.character == name]
        mine = [losses[i] for i in rows]
        total, tokens = sum(loss for loss, _ in mine), sum(n for _, n in mine)
        interval = perplexity_ci([loss for loss, _ in mine], [n for _, n in mine], [samples[i].episode for i in rows],
                                 seed=0) if tokens else {"low": float("nan"), "high": float("nan")}
        figures.append(CharacterScores(name, len(rows), tokens, pooled_perplexity(mine), interval["low"],
                                       interval["high"], exp_mean(total, sum(len(samples[i].response.split())
                                                                              for i in rows))))
    return tuple(figures)


@task(name="evaluate_model", cache_policy=NO_CACHE)
def evaluate_model(bot: Bot, test: EvalSet, judge) -> Scores:
    """Test perplexity (with its interval and per-sample losses) and the judged replies of one loaded model."""
    from tasks.evaluate.judge import judge_replies

    return measure_perplexity(bot, test).judged(judge_replies(bot, judge))


@task(name="log_scores", retries=2, retry_delay_seconds=2)
def log_scores(run_id: str, scores: ScoreSet) -> None:
    """Every finite figure as an MLflow metric test_<figure>_<model>, e.g. test_perplexity_candidate; a cast model's
    also per member, test_<figure>_<model>_<member slug>, and the candidate's attribution confusion matrix as
    attribution_confusion.png."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from castbot.config.profile import slug

    now = int(time.time() * 1000)  # ms
    metrics = [Metric(f"test_{key}_{name}", value, now, 0) for name, score in scores.named().items()
               for key, value in score.metrics().items()]
    metrics += [Metric(f"test_{key}_{name}_{slug(member.character)}", value, now, 0)
                for name, score in scores.named().items() for member in score.characters
                for key, value in member.metrics().items()]
    metrics.append(Metric("test_target_tokens", float(scores.candidate.tokens), now, 0))
    client = MlflowClient()
    client.log_batch(run_id, metrics=metrics)
    if (figure := attribution_picture(scores)) is not None:
        client.log_figure(run_id, figure, "attribution_confusion.png")


def attribution_picture(scores: ScoreSet):
    """The candidate's attribution confusion matrix as a matplotlib Figure; None when it was not measured."""
    from castbot.scores.quality import confusion_figure, confusion_matrix

    said = scores.candidate.said
    if said is None or not said.attributed:
        return None
    cast = list(scores.cast)
    share = f"{said.attribution:.0%}" if said.attribution is not None else "?"
    return confusion_figure(confusion_matrix(list(said.speakers), list(said.attributed), cast), cast,
                            f"candidate's replies: {share} attributed right (chance {1 / len(cast):.0%})")
