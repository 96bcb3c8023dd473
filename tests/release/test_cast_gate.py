"""tasks/release/gate.py for a cast model: a candidate that makes any member worse beyond the noise is refused,
naming the member; one-character decisions are unchanged."""

import math

import pytest

from castbot.config.release import GateConfig
from tasks.evaluate.scores import CharacterScores, Scores, ScoreSet

pytestmark = pytest.mark.unit

# 32 test samples of 8 episodes: Ada speaks 24 (3 an episode), Bram 8 (1 an episode)
EPISODES = [f"E{i // 4}" for i in range(32)]
SPEAKERS = ["Bram" if i % 4 == 3 else "Ada" for i in range(32)]
TOKENS = [10] * 32


def model(losses: list[float], cast: bool = True) -> Scores:
    """Scores with per-sample losses (nats) and, for a cast, per-member figures."""
    members = tuple(CharacterScores(name, SPEAKERS.count(name), 10 * SPEAKERS.count(name), math.exp(
        sum(loss for loss, s in zip(losses, SPEAKERS) if s == name) / (10 * SPEAKERS.count(name))), 1.0, 99.0, 9.0)
        for name in ("Ada", "Bram")) if cast else ()
    return Scores(math.exp(sum(losses) / sum(TOKENS)), 2.0, "t1", sample_losses=losses, sample_tokens=TOKENS,
                  sample_chars=[40] * 32, sample_episodes=EPISODES, sample_characters=SPEAKERS if cast else [],
                  characters=members)


def losses(ada: float, bram: float, wobble: float = 0.0) -> list[float]:
    """Per-sample losses: ada / bram nats per sample, +-wobble alternating by episode."""
    return [(ada if s == "Ada" else bram) + (wobble if int(e[1:]) % 2 else -wobble) for s, e in zip(SPEAKERS, EPISODES)]


def test_a_candidate_better_overall_but_worse_for_one_member_is_refused_naming_the_member():
    from tasks.release.gate import decide

    champion, base = model(losses(30.0, 30.0)), model(losses(60.0, 60.0))
    candidate = model(losses(25.0, 32.0))  # Ada much better, Bram worse on every sample
    assert candidate.perplexity < 0.9 * champion.perplexity
    decision = decide(ScoreSet(candidate, base, champion), GateConfig(max_perplexity=100))
    assert not decision.promote
    assert decision.reason.startswith("candidate makes Bram worse than the champion beyond the noise")
    assert "Bram's 8 test samples" in decision.reason and "gate.noise_confidence" in decision.reason
    assert set(decision.as_tags()) == {"gate.promote", "gate.reason", "gate.candidate", "gate.champion",
                                       "gate.base", "gate.unit"}  # the run's tags keep their names


def test_with_no_champion_a_member_worse_than_the_base_model_is_refused():
    from tasks.release.gate import decide

    decision = decide(ScoreSet(model(losses(20.0, 33.0)), model(losses(40.0, 30.0))), GateConfig(max_perplexity=100))
    assert not decision.promote and "makes Bram worse than the base model beyond the noise" in decision.reason


def test_a_member_worse_only_within_the_noise_passes_and_the_table_shows_every_member():
    from tasks.release.gate import decide

    champion, base = model(losses(30.0, 30.0, wobble=2.0)), model(losses(60.0, 60.0))
    candidate = model(losses(25.0, 30.3, wobble=-2.0))  # Bram: worse on half the episodes, better on the rest
    scores = ScoreSet(candidate, base, champion)
    decision = decide(scores, GateConfig(max_perplexity=100))
    assert decision.promote, decision.reason
    table = decision.markdown(scores)
    assert "| Bram: perplexity per token [95% interval] |" in table and "| Ada: replies attributed to Ada" in table
    off = GateConfig(max_perplexity=100, noise_confidence=0)  # 0: the noise checks are off, per member too
    assert decide(ScoreSet(model(losses(25.0, 32.0)), base, champion), off).promote


def test_one_character_models_decide_as_before():
    """The same losses without sample characters: no per-member check, the overall checks alone decide."""
    from tasks.release.gate import decide

    champion, base = model(losses(30.0, 30.0), cast=False), model(losses(60.0, 60.0), cast=False)
    decision = decide(ScoreSet(model(losses(25.0, 32.0), cast=False), base, champion), GateConfig(max_perplexity=100))
    assert decision.promote and "beats the champion" in decision.reason
    assert "Bram" not in decision.markdown(ScoreSet(model(losses(25.0, 32.0), cast=False), base, champion))
