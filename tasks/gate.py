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

    def as_tags(self) -> dict[str, str]:
        return {f"gate.{k}": str(v) for k, v in asdict(self).items()}

    def markdown(self) -> str:
        champion = "none yet" if self.champion is None else f"{self.champion:.3f}"
        verdict = "**promoted**" if self.promote else "**not promoted**"
        return (
            f"### Gate: {verdict}\n\n{self.reason}\n\n"
            "| model | test perplexity |\n|---|---|\n"
            f"| candidate | {self.candidate:.3f} |\n| champion | {champion} |\n| base | {self.base:.3f} |\n"
        )


def decide(candidate: float, champion: float | None, base: float, gate: GateConfig) -> GateDecision:
    """Promote iff candidate <= max_perplexity and it beats the champion by min_improvement (relative)."""
    if not math.isfinite(candidate) or candidate > gate.max_perplexity:
        reason = f"candidate perplexity {candidate:.3f} is above the limit gate.max_perplexity={gate.max_perplexity}"
        return GateDecision(False, reason, candidate, champion, base)
    if champion is None:
        return GateDecision(True, "no champion yet and the candidate is within the limit", candidate, None, base)
    needed = champion * (1 - gate.min_improvement)
    if candidate > needed:
        reason = (
            f"candidate perplexity {candidate:.3f} does not beat the champion's {champion:.3f} by "
            f"gate.min_improvement={gate.min_improvement:.1%} (needed <= {needed:.3f})"
        )
        return GateDecision(False, reason, candidate, champion, base)
    reason = f"candidate perplexity {candidate:.3f} beats the champion's {champion:.3f} (needed <= {needed:.3f})"
    return GateDecision(True, reason, candidate, champion, base)


@task(name="gate")
def gate_candidate(candidate: float, champion: float | None, base: float, gate: GateConfig) -> GateDecision:
    """Decide promotion and publish the decision table as a Prefect artifact."""
    decision = decide(candidate, champion, base, gate)
    create_markdown_artifact(decision.markdown(), key="gate-decision", description="Promotion decision")
    return decision
