"""tasks/release/gate.py: the gate never promotes a worse model, and its refusals name the figure and the key."""

import dataclasses
import math

import pytest

from castbot.config.release import GateConfig
from tasks.evaluate.scores import Replies, Scores, ScoreSet

pytestmark = pytest.mark.unit


def score(perplexity: float, tokenizer: str = "t1", char_perplexity: float | None = None, **more) -> Scores:
    return Scores(perplexity, char_perplexity or perplexity / 10, tokenizer, **more)


@pytest.mark.parametrize(
    "candidate, champion, promote, why",
    [
        (50.0, None, True, "no champion yet"),
        (50.0, 60.0, True, "beats the champion"),
        (59.9, 60.0, False, "does not beat the champion"),  # better, but by less than 1%
        (60.0, 60.0, False, "does not beat the champion"),
        (70.0, 60.0, False, "does not beat the champion"),
        (150.0, None, False, "above the limit"),
        (float("nan"), None, False, "above the limit"),
        (99.0, None, False, "does not beat the base model"),  # within the limit, but no better than untrained
    ],
)
def test_gate_never_promotes_a_worse_model(candidate, champion, promote, why):
    from tasks.release.gate import decide

    scores = ScoreSet(score(candidate), score(99.5), score(champion) if champion else None)
    decision = decide(scores, GateConfig(max_perplexity=100, min_improvement=0.01))
    assert decision.promote is promote
    assert why in decision.reason


def test_gate_compares_per_character_when_tokenizers_differ():
    """A smaller vocabulary lowers per-token perplexity; per character the candidate is worse and is refused."""
    from tasks.release.gate import decide

    scores = ScoreSet(candidate=score(20.0, "small-vocab", char_perplexity=3.0), base=score(900.0, "small-vocab", 9.0),
                      champion=score(40.0, "big-vocab", char_perplexity=2.5))
    decision = decide(scores, GateConfig(max_perplexity=100, min_improvement=0.01))
    assert not decision.promote and decision.unit == "character"
    assert "does not beat the champion's 2.500" in decision.reason


def paired_scores(candidate_losses, champion_losses, episodes):
    tokens = [10] * len(candidate_losses)

    def paired(losses):
        return score(math.exp(sum(losses) / sum(tokens)), char_perplexity=2.0, sample_losses=losses,
                     sample_tokens=tokens, sample_chars=[40] * len(tokens), sample_episodes=episodes)

    return ScoreSet(candidate=paired(candidate_losses), champion=paired(champion_losses),
                    base=paired([loss * 2 for loss in champion_losses]))


def test_gate_refuses_a_candidate_better_on_average_but_within_the_noise():
    """3% lower perplexity, yet some episodes better and some worse: the paired interval straddles 0."""
    import random

    from tasks.release.gate import decide

    rng = random.Random(0)
    episodes = [f"E{i // 4}" for i in range(24)]
    champion = [30.0 + rng.uniform(-3, 3) for _ in episodes]
    candidate = [loss + (-2.5 if int(e[1:]) % 2 else 2.0) for loss, e in zip(champion, episodes)]
    scores = paired_scores(candidate, champion, episodes)
    assert scores.candidate.perplexity < 0.99 * scores.champion.perplexity
    decision = decide(scores, GateConfig(max_perplexity=100, min_improvement=0.01))
    assert not decision.promote and "beyond the noise" in decision.reason and "nats per token" in decision.reason
    steady = [loss - 0.5 for loss in champion]  # better on every sample
    assert decide(paired_scores(steady, champion, episodes), GateConfig(max_perplexity=100)).promote


@pytest.mark.parametrize("figure, value, field", [
    ("repeat3_rate", 0.9, "max_repeat3_rate"), ("template_leak_rate", 0.5, "max_template_leak_rate"),
    ("empty_rate", 0.75, "max_empty_rate"), ("echo_rate", 0.8, "max_echo_rate"),
    ("likeness", 0.1, "min_likeness"), ("reply_perplexity", 900.0, "max_reply_perplexity"),
])
def test_gate_names_the_failing_reply_check_with_its_figure_and_threshold(figure, value, field):
    from tasks.release.gate import decide

    said = Replies(["a reply"], reply_perplexity=30.0, likeness=0.8, repeat3_rate=0.0, template_leak_rate=0.0,
                   empty_rate=0.0, echo_rate=0.0)
    gate = GateConfig(max_perplexity=100, min_likeness=0.5, max_reply_perplexity=200)
    assert decide(ScoreSet(score(50.0, said=said), score(99.5)), gate).promote
    worse = dataclasses.replace(said, **{figure: value})
    decision = decide(ScoreSet(score(50.0, said=worse), score(99.5)), gate)
    assert not decision.promote and f"gate.{field}" in decision.reason and f"{value:.3f}" in decision.reason


def test_a_reply_figure_that_was_not_measured_is_not_checked_but_a_missing_likeness_refuses():
    """No contexts to answer: no reply figures, nothing to check. Replies judged without a style classifier:
    likeness is nan and gate.min_likeness refuses it."""
    from tasks.release.gate import decide

    gate = GateConfig(max_perplexity=100, min_likeness=0.5, max_repeat3_rate=0.2)
    assert decide(ScoreSet(score(50.0), score(99.5)), gate).promote
    unjudged = Replies(["a reply"], reply_perplexity=30.0)  # likeness nan, degeneracy not measured
    decision = decide(ScoreSet(score(50.0, said=unjudged), score(99.5)), gate)
    assert not decision.promote and "character likeness nan fails gate.min_likeness" in decision.reason


def test_every_finite_figure_keeps_its_mlflow_metric_name_and_the_table_shows_what_was_measured():
    """log_scores logs Scores.metrics() as test_<name>_<model>: the names dashboards and the hidden history read."""
    from tasks.release.gate import decide

    said = Replies(["a", "b"], 30.0, likeness=0.7, likeness_raw=0.6, likeness_ref_character=0.8,
                   likeness_ref_other=0.2, likeness_classifier_auc=0.9, distinct2_ratio=1.0, repeat3_rate=0.0,
                   echo_rate=0.0, empty_rate=0.0, max_tokens_rate=0.5, template_leak_rate=0.0)
    candidate = score(50.0, word_perplexity=90.0, perplexity_low=45.0, perplexity_high=55.0, tokens=120, loss=3.9,
                      total_loss=468.0, sample_losses=[1.0], sample_tokens=[120], sample_chars=[400],
                      sample_episodes=["E1"], said=said)
    assert set(candidate.metrics()) == {
        "perplexity", "char_perplexity", "word_perplexity", "perplexity_low", "perplexity_high", "tokens", "loss",
        "total_loss", "likeness", "likeness_raw", "likeness_ref_character", "likeness_ref_other",
        "likeness_classifier_auc", "reply_perplexity", "distinct2_ratio", "repeat3_rate", "echo_rate", "empty_rate",
        "max_tokens_rate", "template_leak_rate"}
    assert candidate.metrics()["tokens"] == 120.0
    assert "likeness" not in score(50.0, said=Replies(["a"], 30.0)).metrics()  # nan is not logged
    scores = ScoreSet(candidate, score(99.5))
    table = decide(scores, GateConfig(max_perplexity=100)).markdown(scores)
    assert table.splitlines()[4] == "| figure | candidate | base |"
    assert "| character likeness (0 others, 1 character) | 0.700 |  |" in table
    assert "| test perplexity per word | 90.000 | nan |" in table
