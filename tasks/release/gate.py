"""The promotion gate: a candidate becomes champion only if it is good enough and better.

Checked in order, the first failure refuses with its figure and threshold:
1. perplexity <= max_perplexity;
2. what it says: character likeness, fluency (reply perplexity under the reference model), degeneracy rates;
3. it beats the untuned base model by min_improvement;
4. a cast model, per member: no member worse than under the base model or the champion beyond the noise (the
   paired bootstrap interval of the loss difference on that member's samples lies above zero);
5. against the champion: better by min_improvement, and beyond the noise (the paired bootstrap interval of the
   per-sample loss difference lies below zero), and its likeness no lower than the champion's minus a tolerance.
"""

import math
from dataclasses import asdict, dataclass

from prefect import task
from prefect.artifacts import create_markdown_artifact

from castbot.config.release import GateConfig
from castbot.scores.quality import paired_improvement
from tasks.evaluate.scores import Scores, ScoreSet

# (figure, gate field, "max" or "min", label): the reply checks, skipped where the gate field or the figure is None
REPLY_CHECKS = (
    ("likeness", "min_likeness", "min", "character likeness"),
    ("reply_perplexity", "max_reply_perplexity", "max", "reply perplexity under the reference model"),
    ("repeat3_rate", "max_repeat3_rate", "max", "share of replies repeating a 3-gram"),
    ("echo_rate", "max_echo_rate", "max", "share of replies echoing the user"),
    ("empty_rate", "max_empty_rate", "max", "share of empty replies"),
    ("template_leak_rate", "max_template_leak_rate", "max", "share of replies leaking template tokens"),
)
TABLE_ROWS = (("perplexity", "test perplexity per token"), ("perplexity_low", "  95% interval, low"),
              ("perplexity_high", "  95% interval, high"), ("word_perplexity", "test perplexity per word"),
              ("likeness", "character likeness (0 others, 1 character)"),
              ("reply_perplexity", "reply perplexity (fluency)"),
              ("distinct2_ratio", "distinct-2 / character's"), ("repeat3_rate", "repeated 3-gram rate"),
              ("echo_rate", "echo rate"), ("empty_rate", "empty rate"), ("max_tokens_rate", "hit max_new_tokens"),
              ("template_leak_rate", "template leak rate"))


@dataclass
class GateDecision:
    promote: bool
    reason: str
    candidate: float
    champion: float | None
    base: float
    unit: str = "token"  # perplexity per token, or per character when the tokenizers differ

    def as_tags(self) -> dict[str, str]:
        return {f"gate.{k}": str(v) for k, v in asdict(self).items()}

    def markdown(self, scores: ScoreSet | None = None) -> str:
        champion = "none yet" if self.champion is None else f"{self.champion:.3f}"
        verdict = "**promoted**" if self.promote else "**not promoted**"
        table = (f"| model | test perplexity (per {self.unit}) |\n|---|---|\n"
                 f"| candidate | {self.candidate:.3f} |\n| champion | {champion} |\n| base | {self.base:.3f} |\n")
        if scores:
            named = scores.named()
            names = [name for name in ("candidate", "champion", "base") if name in named]
            table = (f"| figure | {' | '.join(names)} |\n|---|{'---|' * len(names)}\n" + "".join(
                f"| {label} | {' | '.join(_cell(named[n].figure(key)) for n in names)} |\n"
                for key, label in TABLE_ROWS if any(named[n].figure(key) is not None for n in names)))
            table += "".join(f"| {label} | {' | '.join(cells)} |\n" for label, cells in cast_rows(scores, names))
        return f"### Gate: {verdict}\n\n{self.reason}\n\n{table}"


def cast_rows(scores: ScoreSet, names: list[str]) -> list[tuple[str, list[str]]]:
    """A cast model's table rows: each member's perplexity with its interval, and its replies' attribution."""
    rows = []
    for member in scores.cast:
        figures = [{c.character: c for c in scores.named()[n].characters}.get(member) for n in names]
        rows.append((f"{member}: perplexity per token [95% interval]", [
            "" if f is None else f"{f.perplexity:.3f} [{f.perplexity_low:.3f}, {f.perplexity_high:.3f}]"
            for f in figures]))
        rows.append((f"{member}: replies attributed to {member} (chance {1 / len(scores.cast):.2f})",
                     ["" if f is None or not f.replies else f"{f.attribution:.2f} of {f.replies}" for f in figures]))
    return rows


def _cell(value) -> str:
    return "" if value is None else f"{value:.3f}"


def reply_failure(candidate: Scores, gate: GateConfig) -> str | None:
    """The first reply check the candidate fails, with its figure and threshold; None when all pass."""
    for key, field, direction, label in REPLY_CHECKS:
        limit, value = getattr(gate, field), candidate.figure(key)
        if limit is None or value is None:
            continue
        if not math.isfinite(value) or (value > limit if direction == "max" else value < limit):
            sign = "<=" if direction == "max" else ">="
            return f"candidate {label} {value:.3f} fails gate.{field} (needed {sign} {limit})"
    return None


def noise_failure(candidate: Scores, champion: Scores, gate: GateConfig, unit: str) -> str | None:
    """Refusal when the paired bootstrap cannot tell the candidate's loss below the champion's; None otherwise."""
    if not gate.noise_confidence or not candidate.sample_losses or not champion.sample_losses:
        return None
    denominators = candidate.sample_tokens if unit == "token" else candidate.sample_chars
    paired = paired_improvement(candidate.sample_losses, champion.sample_losses, denominators,
                                candidate.sample_episodes or None, seed=0, confidence=gate.noise_confidence)
    if paired["significant"]:
        return None
    return (f"candidate perplexity {candidate.perplexity:.3f} does not beat the champion's "
            f"{champion.perplexity:.3f} beyond the noise: the {gate.noise_confidence:.0%} paired bootstrap "
            f"interval of the loss difference is [{paired['low']:+.4f}, {paired['high']:+.4f}] nats per {unit} "
            f"(gate.noise_confidence; it must lie below 0)")


def cast_failure(scores: ScoreSet, gate: GateConfig, unit: str) -> str | None:
    """A cast model: refusal naming the first member whose samples the candidate makes worse than the base model's
    or the champion's beyond the noise (paired bootstrap on that member's samples); None otherwise, and for a
    one-character model."""
    candidate = scores.candidate
    if not gate.noise_confidence or not candidate.sample_characters or not candidate.sample_losses:
        return None
    denominators = candidate.sample_tokens if unit == "token" else candidate.sample_chars
    for member in scores.cast or dict.fromkeys(candidate.sample_characters):
        rows = [i for i, name in enumerate(candidate.sample_characters) if name == member]
        if not rows:
            continue
        for label, reference in (("the base model", scores.base), ("the champion", scores.champion)):
            if reference is None or len(reference.sample_losses) != len(candidate.sample_losses):
                continue
            episodes = [candidate.sample_episodes[i] for i in rows] if candidate.sample_episodes else None
            paired = paired_improvement([candidate.sample_losses[i] for i in rows],
                                        [reference.sample_losses[i] for i in rows], [denominators[i] for i in rows],
                                        episodes, seed=0, confidence=gate.noise_confidence)
            if paired["low"] > 0:  # the whole interval above 0: worse, beyond the noise
                return (f"candidate makes {member} worse than {label} beyond the noise: on {member}'s {len(rows)} "
                        f"test samples the {gate.noise_confidence:.0%} paired bootstrap interval of the loss "
                        f"difference is [{paired['low']:+.4f}, {paired['high']:+.4f}] nats per {unit} "
                        f"(gate.noise_confidence; it must not lie above 0)")
    return None


def decide(scores: ScoreSet, gate: GateConfig) -> GateDecision:
    """Promote iff every check in the module docstring passes. Per token when all tokenizers match, else per
    character."""
    same_tokenizer = len({s.tokenizer for s in scores.named().values()}) == 1
    key, unit = ("perplexity", "token") if same_tokenizer else ("char_perplexity", "character")
    candidate, base = scores.candidate.figure(key), scores.base.figure(key)
    champion = scores.champion.figure(key) if scores.champion else None

    def verdict(promote: bool, reason: str) -> GateDecision:
        return GateDecision(promote, reason, candidate, champion, base, unit)

    per_token = scores.candidate.perplexity
    if not math.isfinite(per_token) or per_token > gate.max_perplexity:
        return verdict(False, f"candidate perplexity {per_token:.3f} is above the limit "
                              f"gate.max_perplexity={gate.max_perplexity}")
    if failure := reply_failure(scores.candidate, gate):
        return verdict(False, failure)
    for name, reference in (("base model", base), ("champion", champion)):
        if reference is None or not math.isfinite(reference):
            continue
        needed = reference * (1 - gate.min_improvement)
        if candidate > needed:
            return verdict(False, f"candidate perplexity {candidate:.3f} does not beat the {name}'s "
                                  f"{reference:.3f} by gate.min_improvement={gate.min_improvement:.1%} "
                                  f"(needed <= {needed:.3f}, per {unit})")
    if failure := cast_failure(scores, gate, unit):
        return verdict(False, failure)
    if champion is None:
        return verdict(True, f"no champion yet; the candidate ({candidate:.3f}) is within the limit and beats "
                             f"the base model ({base:.3f})")
    if failure := noise_failure(scores.candidate, scores.champion, gate, unit):
        return verdict(False, failure)
    ours, theirs = scores.candidate.figure("likeness"), scores.champion.figure("likeness")
    if ours is not None and theirs is not None and ours < theirs - gate.likeness_tolerance:
        return verdict(False, f"candidate character likeness {ours:.3f} is below the champion's {theirs:.3f} "
                              f"by more than gate.likeness_tolerance={gate.likeness_tolerance}")
    return verdict(True, f"candidate perplexity {candidate:.3f} beats the champion's {champion:.3f} "
                         f"(needed <= {champion * (1 - gate.min_improvement):.3f}, per {unit})")


@task(name="gate_candidate")
def gate_candidate(scores: ScoreSet, gate: GateConfig, replies: str = "") -> GateDecision:
    """Decide promotion from the measured scores; one Prefect artifact shows the decision table and, below it,
    the models' replies side by side."""
    decision = decide(scores, gate)
    create_markdown_artifact(decision.markdown(scores) + ("\n" + replies if replies else ""), key="gate-decision",
                             description="Promotion decision and the replies it judged")
    return decision
