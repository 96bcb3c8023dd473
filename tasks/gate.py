"""The promotion gate: a candidate becomes champion only if it is good enough and better."""

import math
from dataclasses import asdict, dataclass

from prefect import task
from prefect.artifacts import create_markdown_artifact

from castbot.config import GateConfig


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

    def markdown(self) -> str:
        champion = "none yet" if self.champion is None else f"{self.champion:.3f}"
        verdict = "**promoted**" if self.promote else "**not promoted**"
        return (
            f"### Gate: {verdict}\n\n{self.reason}\n\n"
            f"| model | test perplexity (per {self.unit}) |\n|---|---|\n"
            f"| candidate | {self.candidate:.3f} |\n| champion | {champion} |\n| base | {self.base:.3f} |\n"
        )


def decide(scores: dict[str, dict | None], gate: GateConfig) -> GateDecision:
    """Promote iff the candidate's perplexity <= max_perplexity and it beats the base model and the champion
    by min_improvement (relative). Per token when all tokenizers match, else per character."""
    same_tokenizer = len({s["tokenizer"] for s in scores.values() if s}) == 1
    key, unit = ("perplexity", "token") if same_tokenizer else ("char_perplexity", "character")
    candidate, base = scores["candidate"][key], scores["base"][key]
    champion = scores["champion"][key] if scores.get("champion") else None

    def verdict(promote: bool, reason: str) -> GateDecision:
        return GateDecision(promote, reason, candidate, champion, base, unit)

    per_token = scores["candidate"]["perplexity"]
    if not math.isfinite(per_token) or per_token > gate.max_perplexity:
        return verdict(False, f"candidate perplexity {per_token:.3f} is above the limit "
                              f"gate.max_perplexity={gate.max_perplexity}")
    for name, reference in (("base model", base), ("champion", champion)):
        if reference is None or not math.isfinite(reference):
            continue
        needed = reference * (1 - gate.min_improvement)
        if candidate > needed:
            return verdict(False, f"candidate perplexity {candidate:.3f} does not beat the {name}'s "
                                  f"{reference:.3f} by gate.min_improvement={gate.min_improvement:.1%} "
                                  f"(needed <= {needed:.3f}, per {unit})")
    if champion is None:
        return verdict(True, f"no champion yet; the candidate ({candidate:.3f}) is within the limit and beats "
                             f"the base model ({base:.3f})")
    return verdict(True, f"candidate perplexity {candidate:.3f} beats the champion's {champion:.3f} "
                         f"(needed <= {champion * (1 - gate.min_improvement):.3f}, per {unit})")


@task(name="gate")
def gate_candidate(scores: dict[str, dict | None], gate: GateConfig) -> GateDecision:
    """Decide promotion from the measured scores and publish the decision table as a Prefect artifact."""
    decision = decide(scores, gate)
    create_markdown_artifact(decision.markdown(), key="gate-decision", description="Promotion decision")
    return decision
