"""Quality checks (castbot/scores/quality.py): the style classifier on the real Rick and Morty transcript, degeneracy
rates, bootstrap intervals for perplexity and the side-by-side table. No model is trained here; < 10 s."""

import math

import numpy as np
import pytest

from castbot.scores.quality import (
    degeneracy,
    likeness,
    paired_improvement,
    perplexity_ci,
    side_by_side_markdown,
    train_character_classifier,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def rick_split(shared_data) -> dict:
    """Rick and Morty lines split by episode: training, anchor and evaluation episodes never overlap."""
    import pandas as pd

    frame = pd.read_csv(shared_data / "rick_and_morty" / "RickAndMortyScripts.csv", encoding="utf-8-sig")
    frame["name"] = frame["name"].replace({"Pickle Rick": "Rick"})  # the alias the rick-and-morty profile uses
    # other Rick variants ("All Ricks", "Cop Rick", ...) are neither clearly Rick nor clearly someone else
    frame = frame[(frame["name"] == "Rick") | ~frame["name"].str.contains("Rick")]
    episodes = sorted(frame["episode name"].unique())  # 11 episodes
    held = {"a": episodes[1::4], "b": episodes[3::4]}  # 3 and 2 episodes with 129 and 79 Rick lines

    def lines(names: list[str], rick: bool) -> list[str]:
        part = frame[frame["episode name"].isin(names)]
        return part[(part["name"] == "Rick") == rick]["line"].tolist()

    train = frame[~frame["episode name"].isin(held["a"] + held["b"])]  # 6 episodes, 982 lines
    classifier = train_character_classifier(list(zip(train["name"], train["line"])), "Rick", seed=0)
    return {"classifier": classifier, **{f"{k}_rick": lines(v, True) for k, v in held.items()},
            **{f"{k}_other": lines(v, False) for k, v in held.items()},
            "train_rick": train[train["name"] == "Rick"]["line"].tolist()}


@pytest.mark.parametrize("anchors, evaluated", [("a", "b"), ("b", "a")])
def test_real_lines_of_unseen_episodes_score_as_their_speakers(rick_split, anchors, evaluated):
    clf = rick_split["classifier"]
    ref_rick, ref_other = rick_split[f"{anchors}_rick"], rick_split[f"{anchors}_other"]
    rick = likeness(clf, rick_split[f"{evaluated}_rick"], ref_rick, ref_other)
    others = likeness(clf, rick_split[f"{evaluated}_other"], ref_rick, ref_other)
    # measured 0.91 / 1.11 for Rick and 0.04 / -0.05 for the others (the two anchor choices); over 9 episode
    # splits, those with >= 79 Rick lines on both sides gave 0.87..1.15 and -0.05..0.04: bounds leave ~0.25 margin
    assert 0.6 <= rick["likeness"] <= 1.4, rick
    assert -0.4 <= others["likeness"] <= 0.4, others
    assert rick["likeness_raw"] > others["likeness_raw"]
    assert rick["likeness_ref_character"] > rick["likeness_ref_other"]


def test_classifier_beats_chance_on_its_own_held_out_lines(rick_split):
    clf = rick_split["classifier"]
    # chance is 0.5 for both; measured AUC 0.78 and balanced accuracy 0.69 (seeds 1-3: >= 0.70 and >= 0.60).
    # Plain accuracy is not asserted: Rick says 29% of the lines, so always answering "not Rick" scores 0.71.
    assert clf.heldout_auc >= 0.65
    assert clf.heldout_balanced_accuracy >= 0.58
    assert 0 <= clf.heldout_accuracy <= 1
    scores = clf.score(["Morty, *burp* listen to me, Morty.", "Oh, geez, Rick, I don't know."])
    assert all(0 <= s <= 1 for s in scores) and scores[0] > scores[1]


def test_likeness_refuses_anchors_that_do_not_separate(rick_split):
    same = rick_split["a_rick"]
    with pytest.raises(ValueError, match="does not separate"):
        likeness(rick_split["classifier"], ["Wubba lubba dub dub!"], same, same)


def test_classifier_refuses_too_few_character_lines():
    lines = [("Rick", "Morty!")] * 2 + [("Morty", "Oh, man.")] * 20
    with pytest.raises(ValueError, match="at least 5 lines of 'Rick'"):
        train_character_classifier(lines, "Rick")


def test_replies_as_varied_as_the_character_and_a_bot_on_repeat(rick_split):
    real, held = rick_split["train_rick"], rick_split["b_rick"][:60]
    users = ["What now?"] * 60
    as_varied = degeneracy(held, users, real, [False] * 60)
    on_repeat = degeneracy((held[:3] * 20), users, real, [False] * 60)
    # real Rick lines as "replies": distinct-2 matches real text of the same size (measured 1.02); three lines
    # on repeat measured 0.07
    assert 0.8 <= as_varied["distinct2_ratio"] <= 1.2
    assert on_repeat["distinct2_ratio"] < 0.3


def test_degenerate_replies_are_counted():
    replies = ["I am I am I am I am", "where are we going, Rick?", "", "  ...  ", "assistant\nHello",
               "Sure thing.<|im_end|>", "User: what next", "Get in the car.</s>"]
    users = ["Who are you?", "Where are we going, Rick?", "Hi.", "Hi.", "Hi.", "Hi.", "Hi.", "Hi."]
    rates = degeneracy(replies, users, ["Morty, get in the car.", "We're going on an adventure, Morty."],
                       [True, False, False, False, True, False, False, False])
    assert rates["repeat3_rate"] == 1 / 8
    assert rates["echo_rate"] == 1 / 8  # case and punctuation do not hide a copied turn
    assert rates["empty_rate"] == 2 / 8
    assert rates["template_leak_rate"] == 4 / 8
    assert rates["max_tokens_rate"] == 2 / 8
    loops = degeneracy(["I am I am I am I am"] * 3, ["Hi."] * 3, ["Morty, get in the car now."], [False] * 3)
    assert loops["repeat3_rate"] == 1


def test_clean_varied_replies_score_zero():
    replies = ["We're going to another dimension, Morty.", "The system is down, so use the portal gun.",
               "Science isn't about why, it's about why not.", "Yes."]
    users = ["Where are we going?", "What do we do now, Rick?", "Why would you do that?", "Yes or no?"]
    rates = degeneracy(replies, users, ["Morty, listen to me.", "Nobody exists on purpose, Morty."], [False] * 4)
    assert {k: v for k, v in rates.items() if k != "distinct2_ratio"} == {
        "repeat3_rate": 0, "echo_rate": 0, "empty_rate": 0, "max_tokens_rate": 0, "template_leak_rate": 0}
    with pytest.raises(ValueError, match="one entry per reply"):
        degeneracy(replies, users[:2], ["Morty, listen."], [False] * 4)


def episode_losses(seed: int = 0, episodes: int = 12, per_episode: int = 10):
    """Per-sample summed losses (nats) and token counts; episodes differ in difficulty, as real ones do."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 40, size=episodes * per_episode)
    episode_loss = rng.normal(3.0, 0.5, size=episodes).repeat(per_episode)  # nats/token of each episode
    losses = tokens * (episode_loss + rng.normal(0, 0.2, size=tokens.size))
    groups = [f"E{i // per_episode}" for i in range(tokens.size)]
    return losses.tolist(), tokens.tolist(), groups


def test_perplexity_is_total_loss_over_total_tokens():
    # two samples: 2 nats over 1 token and 4 nats over 3; the mean of per-sample means would be exp(1.67)
    assert perplexity_ci([2.0, 4.0], [1, 3], None, seed=0)["perplexity"] == pytest.approx(math.exp(6 / 4))
    assert perplexity_ci([1e6], [1], None, seed=0) == {"perplexity": math.inf, "low": math.inf, "high": math.inf}


def test_bootstrap_interval_is_reproducible_and_brackets_the_estimate():
    losses, tokens, groups = episode_losses()
    first = perplexity_ci(losses, tokens, groups, seed=7)
    assert perplexity_ci(losses, tokens, groups, seed=7) == first
    assert perplexity_ci(losses, tokens, groups, seed=8) != first
    assert first["low"] < first["perplexity"] < first["high"]
    # episodes differ in difficulty: resampling samples alone would claim more certainty than there is
    by_sample = perplexity_ci(losses, tokens, None, seed=7)
    assert by_sample["high"] - by_sample["low"] < first["high"] - first["low"]


def test_paired_improvement_needs_a_real_difference():
    losses, tokens, groups = episode_losses()
    same = paired_improvement(losses, losses, tokens, groups, seed=0)
    assert same["delta"] == 0 and not same["significant"]
    better = [loss - 0.1 * n for loss, n in zip(losses, tokens)]  # 0.1 nats/token lower on every sample
    result = paired_improvement(better, losses, tokens, groups, seed=0)
    assert result["delta"] == pytest.approx(-0.1)
    assert result["low"] <= result["delta"] <= result["high"] < 0 and result["significant"]
    worse = paired_improvement(losses, better, tokens, groups, seed=0)
    assert worse["delta"] > 0 and not worse["significant"]


def test_side_by_side_table():
    contexts = [["Hi.", "Where | are we\ngoing?"], ["x" * 500 + " the last turn"]]
    table = side_by_side_markdown(contexts, {"base": ["ok", ""], "champion": ["Morty!"]})
    header, rule, first, second = table.strip().split("\n")
    assert header == "| context | base | champion |" and rule == "|---|---|---|"
    assert first == "| Hi. / Where \\| are we / going? | ok | Morty! |"
    assert second.startswith("| …x") and "the last turn |" in second  # long context keeps its end
    assert second.endswith("| _(empty)_ |  |")  # an empty reply is shown; a missing one is blank
    assert len(side_by_side_markdown(contexts * 20, {"base": ["ok"] * 40}, limit=5).strip().split("\n")) == 7
