"""What evaluation hands from step to step: the test split's samples (Sample; tasks.evaluate.perplexity.EvalSet
encodes them once per run), one model's figures (Scores) with what it said (Replies), and a run's models side by
side (ScoreSet). A cast model's figures are also split by cast member (CharacterScores).

A figure's field name is the middle of its MLflow metric, test_<figure>_<model>: Scores.perplexity of the candidate
is logged as test_perplexity_candidate; a cast member's as test_<figure>_<model>_<member slug>
(test_perplexity_candidate_morty).
"""

import math
from dataclasses import dataclass, field, fields, replace

from castbot.model.dialogue import Turn


@dataclass(frozen=True)
class Sample:
    """A held-out dialogue sample: the character's response to the context turns before it, in one episode."""

    episode: str
    context: tuple[str, ...]
    speakers: tuple[str, ...]  # one per context line; "" for an unnamed user
    response: str
    character: str = ""  # a cast model's sample: who speaks the response; "" for a one-character model

    @classmethod
    def of(cls, sample: dict) -> "Sample":
        """A split's dict (tasks.data.dialogues) as a Sample; samples built before speakers were kept have none."""
        context = tuple(sample["context"])
        return cls(sample["episode"], context, tuple(sample.get("speakers") or [""] * len(context)),
                   sample["response"], sample.get("character", ""))

    def turns(self) -> list[Turn]:
        """(speaker, text) of each context line."""
        return list(zip(self.speakers, self.context))

    def as_dict(self) -> dict:
        """The dict a split holds, as Bot.encode reads it."""
        as_dict = {"episode": self.episode, "context": list(self.context), "speakers": list(self.speakers),
                   "response": self.response}
        return {**as_dict, "character": self.character} if self.character else as_dict


@dataclass(frozen=True)
class Replies:
    """What a model said to the judge's contexts, and how it reads. A figure left None was not measured (too few
    lines for it); likeness is nan where replies were judged without a style classifier (a gate on it refuses)."""

    texts: list[str]
    reply_perplexity: float  # per token of the non-empty replies under the reference model: fluency
    likeness: float = math.nan  # rescaled style score: other speakers' real lines 0, the character's 1
    likeness_raw: float | None = None  # mean classifier probability of the replies
    likeness_ref_character: float | None = None  # ... of the character's held-out lines
    likeness_ref_other: float | None = None  # ... of other speakers' held-out lines
    likeness_classifier_auc: float | None = None
    distinct2_ratio: float | None = None  # distinct-2 of the replies / the character's (size-matched)
    repeat3_rate: float | None = None  # shares of replies: ...that repeat a word 3-gram
    echo_rate: float | None = None  # ...that copy the user's last turn
    empty_rate: float | None = None  # ...with no letter or digit
    max_tokens_rate: float | None = None  # ...stopped by max_new_tokens
    template_leak_rate: float | None = None  # ...holding template or role tokens
    attribution: float | None = None  # a cast model: share of replies the attribution classifier gives to the
    attribution_chance: float | None = None  # cast member they were asked of; and chance, 1 / cast size
    cast: tuple[str, ...] = ()  # a cast model: its members, in the profile's order
    speakers: tuple[str, ...] = ()  # a cast model: the member each reply was asked of, one per text
    attributed: tuple[str, ...] = ()  # ... and the member the attribution classifier gives it to


@dataclass(frozen=True)
class Scores:
    """One model's figures on the test split (tasks.evaluate.perplexity.measure_perplexity) and, once judged, its
    replies. Perplexities are exp(total loss / count): per target token, per character, per word."""

    perplexity: float
    char_perplexity: float  # per character of the responses (+1 per end-of-turn): compares tokenizers
    tokenizer: str  # tokenizer_fingerprint: equal ones make per-token perplexities comparable
    word_perplexity: float = math.nan
    perplexity_low: float = math.nan  # 95% bootstrap interval over episodes
    perplexity_high: float = math.nan
    tokens: int = 0  # target tokens
    loss: float = math.nan  # nats per target token
    total_loss: float = math.nan  # nats
    format: str = "eos"  # the dialogue format's style
    # per sample, in test-split order: the gate's paired comparison with the champion
    sample_losses: list[float] = field(default_factory=list, repr=False)  # nats
    sample_tokens: list[int] = field(default_factory=list, repr=False)
    sample_chars: list[int] = field(default_factory=list, repr=False)
    sample_episodes: list[str] = field(default_factory=list, repr=False)
    sample_characters: list[str] = field(default_factory=list, repr=False)  # a cast model's: who speaks each
    said: Replies | None = None  # None: not judged (no contexts to answer)
    characters: tuple["CharacterScores", ...] = ()  # a cast model: figures per cast member, in cast order

    def figure(self, name: str) -> float | None:
        """A figure by its metric name, this model's own or its replies'; None where it was not measured."""
        if name in SCORE_FIELDS:
            return getattr(self, name)
        return getattr(self.said, name) if self.said is not None and name in REPLY_FIGURES else None

    def metrics(self) -> dict[str, float]:
        """Every finite number by its metric name: what MLflow logs as test_<name>_<model>."""
        figures = {name: getattr(self, name) for name in SCORE_FIELDS}
        if self.said is not None:
            figures |= {name: getattr(self.said, name) for name in REPLY_FIGURES}
        return {name: float(value) for name, value in figures.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}

    def judged(self, said: Replies | None) -> "Scores":
        """These figures with the replies, and each cast member's attribution taken from them."""
        if said is None or not said.cast:
            return replace(self, said=said)
        measured = {c.character: c for c in self.characters}
        nan = math.nan  # a member with no test sample: no perplexity, perhaps still replies
        return replace(self, said=said, characters=tuple(
            measured.get(name, CharacterScores(name, 0, 0, nan, nan, nan, nan)).with_replies(said)
            for name in said.cast))


@dataclass(frozen=True)
class CharacterScores:
    """One cast member's figures for one model: perplexity on the test samples that member speaks, with its 95%
    bootstrap interval over episodes, and the share of the replies asked of that member that the attribution
    classifier gives to that member (nan: none judged)."""

    character: str
    samples: int
    tokens: int  # target tokens
    perplexity: float  # exp(loss / tokens) over this member's samples
    perplexity_low: float
    perplexity_high: float
    word_perplexity: float
    replies: int = 0
    attribution: float = math.nan

    def with_replies(self, said: Replies) -> "CharacterScores":
        """With the number of replies asked of this member and the share of them attributed to this member."""
        replies = sum(asked == self.character for asked in said.speakers)
        mine = [attributed for asked, attributed in zip(said.speakers, said.attributed) if asked == self.character]
        share = sum(a == self.character for a in mine) / len(mine) if mine else math.nan  # nan: not attributed
        return replace(self, replies=replies, attribution=share)

    def metrics(self) -> dict[str, float]:
        """The finite figures by the middle of their metric name (test_<figure>_<model>_<member>)."""
        figures = {name: getattr(self, name) for name in CHARACTER_FIGURES}
        return {name: float(value) for name, value in figures.items() if math.isfinite(value)}


SCORE_FIELDS = tuple(f.name for f in fields(Scores) if f.name not in ("said", "characters"))
REPLY_FIGURES = tuple(f.name for f in fields(Replies) if f.name not in ("texts", "cast", "speakers", "attributed"))
CHARACTER_FIGURES = ("perplexity", "perplexity_low", "perplexity_high", "word_perplexity", "attribution")


@dataclass(frozen=True)
class ScoreSet:
    """The models one run measured on one test split."""

    candidate: Scores
    base: Scores  # the untuned base model, in the training format
    champion: Scores | None = None  # None: no champion yet

    def named(self) -> dict[str, Scores]:
        """candidate, base and (if any) champion by the names metrics and tables use."""
        named = {"candidate": self.candidate, "base": self.base, "champion": self.champion}
        return {name: scores for name, scores in named.items() if scores is not None}

    @property
    def cast(self) -> tuple[str, ...]:
        """The cast members the candidate was measured on, in cast order; () for a one-character model."""
        return tuple(c.character for c in self.candidate.characters)
