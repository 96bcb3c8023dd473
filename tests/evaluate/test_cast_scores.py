"""A cast model judged per member: perplexity per member with its interval, attribution of the replies against
chance, and the confusion matrix as a picture."""

import math

import pytest

from tests.conftest import tiny_show_rows

pytestmark = pytest.mark.unit

CAST = ["Ada", "Bram", "Cleo"]


def styled_lines(n: int = 40) -> list[tuple[str, str]]:
    """Three speakers with their own tics: Ada says 'science', Bram stutters, Cleo asks about the moon."""
    lines = []
    for i in range(n):
        lines += [("Ada", f"Science says {i} is the answer, obviously, science."),
                  ("Bram", f"W-w-well, I d-don't know about {i}, man."),
                  ("Cleo", f"Is the moon {i} miles away tonight?")]
    return lines


def test_the_attribution_classifier_tells_members_apart_and_counts_against_chance():
    from castbot.scores.quality import attribution, confusion_matrix, train_cast_classifier

    classifier = train_cast_classifier(styled_lines() + [("Extra", "not in the cast")] * 9, CAST, seed=0)
    assert classifier.cast == CAST and classifier.heldout_balanced_accuracy > 0.9
    attributed = classifier.attribute(["Science, obviously science.", "W-w-well, m-man.", "The moon tonight?"])
    assert attributed == CAST
    asked = ["Ada", "Ada", "Bram", "Cleo"]
    said = ["Ada", "Bram", "Bram", "Bram"]
    assert attribution(asked, said, CAST) == {"attribution": 0.5, "attribution_chance": pytest.approx(1 / 3)}
    assert confusion_matrix(asked, said, CAST).tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    with pytest.raises(ValueError, match=r"every cast member .* got Ada \(2\), Bram \(2\), Cleo \(2\)"):
        train_cast_classifier(styled_lines(2), CAST)


def test_the_confusion_matrix_is_a_png_picture(tmp_path):
    import numpy as np

    from castbot.scores.quality import confusion_figure

    figure = confusion_figure(np.array([[3, 1, 0], [0, 4, 0], [2, 0, 2]]), CAST, "candidate")
    figure.savefig(tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [axes] = [a for a in figure.axes if a.get_title() == "candidate"]
    assert [t.get_text() for t in axes.get_yticklabels()] == CAST
    assert "4\n100%" in [t.get_text() for t in axes.texts]


@pytest.fixture(scope="module")
def cast_bot(tmp_path_factory):
    """A tiny chat-template model (offline-tiny's Llama layout) that speaks as Ada by default."""
    from castbot.config.training import OfflineModelConfig
    from castbot.model.bot import Bot
    from castbot.model.dialogue import DialogueFormat
    from tasks.train.base_model import build_offline_model

    shape = OfflineModelConfig(architecture="llama", vocab_size=400, n_layer=1, n_embd=32, n_head=2)
    folder = build_offline_model([r["line"] for r in tiny_show_rows()], shape, 0, tmp_path_factory.mktemp("m"))
    return Bot.load(str(folder), fmt=DialogueFormat("chat", "Ada", "The Tiny Show"), max_length=96)


def cast_samples() -> list[dict]:
    import pandas as pd

    from tasks.data.dialogues import samples_for

    frame = pd.DataFrame(tiny_show_rows(episodes=3))
    return samples_for(frame, CAST, context_turns=2)


def test_perplexity_per_member_pools_that_members_samples_with_an_interval(cast_bot):
    from tasks.evaluate.perplexity import EvalSet, measure_perplexity

    samples = cast_samples()
    scores = measure_perplexity(cast_bot, EvalSet.encode(samples, cast_bot, 96))
    assert [c.character for c in scores.characters] == ["Bram", "Ada", "Cleo"]  # as first met before judging
    assert scores.sample_characters == [s["character"] for s in samples]
    assert sum(c.tokens for c in scores.characters) == scores.tokens
    for member in scores.characters:
        rows = [i for i, name in enumerate(scores.sample_characters) if name == member.character]
        loss, tokens = sum(scores.sample_losses[i] for i in rows), sum(scores.sample_tokens[i] for i in rows)
        assert member.samples == len(rows) and member.tokens == tokens
        assert member.perplexity == pytest.approx(math.exp(loss / tokens))
        assert member.perplexity_low <= member.perplexity <= member.perplexity_high
    one = measure_perplexity(cast_bot, EvalSet.encode([{k: v for k, v in s.items() if k != "character"}
                                                       for s in samples], cast_bot, 96))
    assert one.characters == () and one.sample_characters == []  # a one-character model: nothing per member
    assert set(one.metrics()) == set(scores.metrics())  # and the same metric names


def test_each_reply_is_asked_as_its_member_and_attributed(cast_bot):
    from castbot.scores.quality import train_cast_classifier
    from tasks.evaluate.judge import Judge, as_character, judge_replies
    from tasks.evaluate.scores import Sample

    bram = as_character(cast_bot, "Bram")
    assert bram.model is cast_bot.model and cast_bot.format.character == "Ada"
    assert "You are Bram from The Tiny Show." in cast_bot.tokenizer.decode(bram.prompt([("Ada", "Hi")], 8))
    contexts = [Sample.of(s) for s in cast_samples()[:9]]
    judge = Judge(None, [], [], [line for _, line in styled_lines()], contexts, cast_bot, 96, 0, tuple(CAST),
                  train_cast_classifier(styled_lines(), CAST))
    said = judge_replies(cast_bot, judge)
    assert said.cast == tuple(CAST) and said.speakers == tuple(s.character for s in contexts)
    assert len(said.attributed) == len(said.texts) == 9 and set(said.attributed) <= set(CAST)
    assert said.attribution_chance == pytest.approx(1 / 3)
    assert said.attribution == pytest.approx(sum(a == b for a, b in zip(said.speakers, said.attributed)) / 9)
    assert math.isnan(said.likeness)  # a cast is judged by attribution, not by one character's likeness


def test_scores_take_each_members_attribution_from_the_replies():
    from tasks.evaluate.scores import CharacterScores, Replies, Scores, ScoreSet

    said = Replies(["a", "b", "c", "d"], 10.0, attribution=0.5, attribution_chance=1 / 3, cast=tuple(CAST),
                   speakers=("Ada", "Ada", "Bram", "Cleo"), attributed=("Ada", "Bram", "Bram", "Ada"))
    measured = Scores(20.0, 2.0, "t", characters=(CharacterScores("Bram", 4, 40, 30.0, 25.0, 35.0, 90.0),
                                                  CharacterScores("Ada", 6, 60, 15.0, 12.0, 18.0, 45.0)))
    judged = measured.judged(said)
    assert [c.character for c in judged.characters] == CAST  # cast order once judged
    ada, bram, cleo = judged.characters
    assert (ada.attribution, ada.replies, ada.perplexity) == (0.5, 2, 15.0)
    assert (bram.attribution, cleo.attribution, cleo.samples) == (1.0, 0.0, 0)  # Cleo: no test sample
    assert "perplexity" not in cleo.metrics() and cleo.metrics()["attribution"] == 0.0
    assert ScoreSet(judged, judged).cast == tuple(CAST)
    assert {"attribution", "attribution_chance"} <= set(judged.metrics())
    assert not {"cast", "speakers", "attributed"} & set(judged.metrics())
