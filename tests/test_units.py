"""Fast tests of the pieces users rely on: config errors, dialogue format, splits, perplexity, gate."""

import math
import os
import textwrap

import pytest

from castbot.config import ConfigError, GateConfig, load_profile
from tests.conftest import CHARACTER, tiny_show_rows

pytestmark = pytest.mark.unit


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize(
    "section, message",
    [
        ("training: {learning_rat: 0.1}", r"training\.learning_rat: Extra inputs are not permitted"),
        ("gate: {min_improvement: 2}", r"gate\.min_improvement: Input should be less than 1"),
        ("gate: {max_perplexity: 50}\ngate: {max_perplexity: 5000}", r"line 4: key 'gate' is given twice"),
        ("training: {epochs: 1, epochs: 2}", r"line 3: key 'epochs' is given twice"),
    ],
)
def test_a_bad_profile_key_is_named(tmp_path, section, message):
    profile = write(tmp_path / "p.yaml", f"data: {{path: x.csv}}\ncharacter: Rick\n{section}\n")
    with pytest.raises(ConfigError, match=message):
        load_profile(profile)


def test_relative_data_path_resolves_against_profile_folder(tmp_path):
    (tmp_path / "configs").mkdir()
    profile = write(tmp_path / "configs" / "p.yaml", "data: {path: ../data/show.csv}\ncharacter: Rick\n")
    assert load_profile(profile).data.path == str(tmp_path / "data" / "show.csv")


def test_shipped_profiles_load_and_each_registers_under_its_own_name():
    """Every deployed profile in configs/ loads; two sharing a registry name would replace each other's champion."""
    from deployments.render import deployed_profiles

    profiles = {path.name: load_profile(path) for path in deployed_profiles()}
    names = [config.model_name for config in profiles.values()]
    assert len(set(names)) == len(names), names
    assert profiles["rick-dialogpt-small.yaml"].base_model == "microsoft/DialoGPT-small"
    assert profiles["demo.yaml"].gate.max_perplexity < 1000


def test_defaults_follow_the_method_and_a_short_run_still_validates(tmp_path):
    """A profile that sets only the method and a short run: LoRA gets LoRA's learning rate, full fine-tuning 10x
    less, and 24 steps validate every 6 (with a checkpoint each time), so the best checkpoint is the one kept."""
    lora = write(tmp_path / "lora.yaml",
                 "data: {path: s.csv}\ncharacter: Rick\ntraining: {method: lora, max_steps: 24}\n")
    full = write(tmp_path / "full.yaml", "data: {path: s.csv}\ncharacter: Rick\ntraining: {method: full}\n")
    assert load_profile(lora).training.learning_rate == 1e-3
    assert load_profile(full).training.learning_rate == 1e-4
    short = load_profile(lora).training
    assert (short.eval_steps, short.save_steps) == (6, 6)
    assert (load_profile(full).training.eval_steps, load_profile(full).training.save_steps) == (50, 50)
    set_by_hand = write(tmp_path / "hand.yaml", "data: {path: s.csv}\ncharacter: Rick\n"
                        "training: {method: lora, max_steps: 24, eval_steps: 8, learning_rate: 0.002}\n")
    assert load_profile(set_by_hand).training.model_dump(include={"eval_steps", "save_steps", "learning_rate"}) == {
        "eval_steps": 8, "save_steps": 8, "learning_rate": 0.002}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from castbot.config import OfflineModelConfig
    from tasks.train.base_model import build_offline_model
    from castbot.model.folder import load_tokenizer

    texts = [row["line"] for row in tiny_show_rows()]
    folder = build_offline_model(texts, OfflineModelConfig(vocab_size=300, n_layer=1, n_embd=32, n_head=2),
                                 seed=0, folder=tmp_path_factory.mktemp("m") / "model")
    return load_tokenizer(str(folder))


def test_sample_joins_turns_with_eos_and_masks_context(tokenizer):
    from castbot.model.dialogue import IGNORE_INDEX, DialogueFormat

    sample = DialogueFormat().encode_sample(tokenizer, [("", "Hello there"), ("", "How are you")], "Fine thanks", 64)
    eos = tokenizer.eos_token_id
    assert sample["input_ids"].count(eos) == 3 and sample["input_ids"][-1] == eos
    n_response = len(tokenizer.encode("Fine thanks", add_special_tokens=False)) + 1
    assert sample["labels"][-n_response:] == sample["input_ids"][-n_response:]
    assert set(sample["labels"][:-n_response]) == {IGNORE_INDEX}
    assert tokenizer.decode(sample["input_ids"], skip_special_tokens=True).endswith("Fine thanks")


def test_truncation_drops_oldest_turns_never_the_response(tokenizer):
    from castbot.model.dialogue import DialogueFormat

    context = [("", f"old turn number {i} about the rocket") for i in range(30)]
    sample = DialogueFormat().encode_sample(tokenizer, context, "The newest answer", 40)
    text = tokenizer.decode(sample["input_ids"], skip_special_tokens=False)
    assert len(sample["input_ids"]) <= 40
    assert text.endswith("The newest answer" + tokenizer.eos_token)
    assert "old turn number 29" in text and "old turn number 0 " not in text


def test_loss_on_all_keeps_every_label(tokenizer):
    from castbot.model.dialogue import DialogueFormat

    sample = DialogueFormat().encode_sample(tokenizer, [("", "Hello")], "Hi", 32, loss_on="all")
    assert sample["labels"] == sample["input_ids"]


def test_splits_never_share_an_episode():
    import pandas as pd

    from castbot.config import DialogueConfig
    from tasks.data.dialogues import build_dialogues

    frame = pd.DataFrame(tiny_show_rows(episodes=10))
    splits = build_dialogues.fn(frame, CHARACTER, DialogueConfig(context_turns=2), seed=1)
    episodes = {name: {s["episode"] for s in samples} for name, samples in splits.items()}
    assert not episodes["train"] & episodes["test"] and not episodes["train"] & episodes["validation"]
    assert not episodes["validation"] & episodes["test"]
    seen = {(tuple(s["context"]), s["response"]) for s in splits["train"]}
    assert not any((tuple(s["context"]), s["response"]) in seen for s in splits["validation"] + splits["test"])
    n_lines = sum(1 for r in tiny_show_rows(episodes=10) if r["speaker"] == CHARACTER)
    assert len(splits["train"]) + len(splits["validation"]) + len(splits["test"]) <= n_lines
    assert splits["validation"] and splits["test"]
    # context comes from the same episode and scene, at most context_turns lines
    assert all(len(s["context"]) <= 2 for s in splits["train"])


def test_another_transcript_adds_only_its_new_episodes_to_training():
    """A second transcript of the show names episodes its own way; the episodes both hold are left out, and
    validation and test stay exactly the first transcript's."""
    import pandas as pd

    from castbot.config import DialogueConfig
    from tasks.data.dialogues import build_dialogues, new_episodes

    frame = pd.DataFrame(tiny_show_rows(episodes=10))
    copy = frame[frame["episode"].isin(["E3", "E7"])].assign(  # the same two episodes, scraped again
        episode=lambda f: f["episode"].map({"E3": "103", "E7": "107"}), line=lambda f: f["line"].str.upper())
    new = pd.DataFrame([{"episode": str(e), "scene": "0", "speaker": CHARACTER if i % 2 else "Bram",
                         "line": f"In episode {e} we have line number {i} of a brand new adventure"}
                        for e in (11, 12, 13, 14) for i in range(10)])
    quoted = max(frame["line"], key=len)  # one line in eleven quoted from the first transcript: still a new episode
    new = pd.concat([new, pd.DataFrame([{"episode": "11", "scene": "0", "speaker": "Bram", "line": quoted}])])
    other = pd.concat([copy, new])
    kept, repeated = new_episodes(other, frame)
    assert sorted(repeated) == ["103", "107"] and set(kept["episode"]) == {"11", "12", "13", "14"}

    config = DialogueConfig(context_turns=2)
    alone = build_dialogues.fn(frame, CHARACTER, config, seed=1)
    both = build_dialogues.fn(frame, CHARACTER, config, seed=1, more={"scrape": other})
    assert both["test"] == alone["test"] and both["validation"] == alone["validation"]
    added = both["train"][len(alone["train"]):]
    assert both["train"][:len(alone["train"])] == alone["train"]
    assert {s["episode"] for s in added} == {"scrape:11", "scrape:12", "scrape:13", "scrape:14"}
    assert len(added) == (new["speaker"] == CHARACTER).sum()


def test_also_train_on_must_name_a_profile_of_the_same_character(tmp_path):
    write(tmp_path / "morty.yaml", "data: {path: other.csv}\ncharacter: Morty\n")
    write(tmp_path / "chain.yaml", "data: {path: other.csv, also_train_on: [morty.yaml]}\ncharacter: Rick\n")
    write(tmp_path / "rick2.yaml", "data: {path: other.csv}\ncharacter: Rick\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "rick2.yaml", "data: {path: other.csv}\ncharacter: Rick\n")
    cases = {"morty.yaml": r"names a profile of 'Morty', not 'Rick'", "chain.yaml": "has its own also_train_on",
             "missing.yaml": r"data\.also_train_on: .*missing\.yaml: profile not found",
             "rick2.yaml, sub/rick2.yaml": "names two profiles called 'rick2': rename one"}
    for others, message in cases.items():
        profile = write(tmp_path / "p.yaml", f"data: {{path: x.csv, also_train_on: [{others}]}}\ncharacter: Rick\n")
        with pytest.raises(ConfigError, match=message):
            load_profile(profile)
    profile = write(tmp_path / "p.yaml", "data: {path: x.csv, also_train_on: [rick2.yaml]}\ncharacter: Rick\n")
    assert load_profile(profile).data.also_train_on == [str(tmp_path / "rick2.yaml")]


def score(perplexity: float, tokenizer: str = "t1", char_perplexity: float | None = None) -> dict:
    return {"perplexity": perplexity, "char_perplexity": char_perplexity or perplexity / 10, "tokenizer": tokenizer}


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

    scores = {"candidate": score(candidate), "base": score(99.5),
              "champion": score(champion) if champion else None}
    decision = decide(scores, GateConfig(max_perplexity=100, min_improvement=0.01))
    assert decision.promote is promote
    assert why in decision.reason


def test_gate_compares_per_character_when_tokenizers_differ():
    """A smaller vocabulary lowers per-token perplexity; per character the candidate is worse and is refused."""
    from tasks.release.gate import decide

    scores = {"candidate": score(20.0, "small-vocab", char_perplexity=3.0), "base": score(900.0, "small-vocab", 9.0),
              "champion": score(40.0, "big-vocab", char_perplexity=2.5)}
    decision = decide(scores, GateConfig(max_perplexity=100, min_improvement=0.01))
    assert not decision.promote and decision.unit == "character"
    assert "does not beat the champion's 2.500" in decision.reason


def paired_scores(candidate_losses, champion_losses, episodes):
    tokens = [10] * len(candidate_losses)

    def score(losses):
        return {"perplexity": math.exp(sum(losses) / sum(tokens)), "char_perplexity": 2.0, "tokenizer": "t1",
                "sample_losses": losses, "sample_tokens": tokens, "sample_chars": [40] * len(tokens),
                "sample_episodes": episodes}

    return {"candidate": score(candidate_losses), "champion": score(champion_losses),
            "base": score([loss * 2 for loss in champion_losses])}


def test_gate_refuses_a_candidate_better_on_average_but_within_the_noise():
    """3% lower perplexity, yet some episodes better and some worse: the paired interval straddles 0."""
    import random

    from tasks.release.gate import decide

    rng = random.Random(0)
    episodes = [f"E{i // 4}" for i in range(24)]
    champion = [30.0 + rng.uniform(-3, 3) for _ in episodes]
    candidate = [loss + (-2.5 if int(e[1:]) % 2 else 2.0) for loss, e in zip(champion, episodes)]
    scores = paired_scores(candidate, champion, episodes)
    assert scores["candidate"]["perplexity"] < 0.99 * scores["champion"]["perplexity"]
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

    scores = {"candidate": {**score(50.0), "repeat3_rate": 0.0, "template_leak_rate": 0.0, "empty_rate": 0.0,
                            "echo_rate": 0.0, "likeness": 0.8, "reply_perplexity": 30.0},
              "base": score(99.5), "champion": None}
    gate = GateConfig(max_perplexity=100, min_likeness=0.5, max_reply_perplexity=200)
    assert decide(scores, gate).promote
    scores["candidate"][figure] = value
    decision = decide(scores, gate)
    assert not decision.promote and f"gate.{field}" in decision.reason and f"{value:.3f}" in decision.reason


def test_conftest_is_imported_once_so_the_session_has_one_state_folder():
    import sys

    import tests.conftest

    assert "conftest" not in sys.modules or sys.modules["conftest"] is tests.conftest
    assert os.environ["CASTBOT_HOME"] == str(tests.conftest.STATE)


def test_bentoml_traffic_settings_still_lack_what_the_admission_middleware_adds():
    """When this fails, BentoML's traffic settings gained a body limit or more: service.py's Admission may shrink."""
    from pathlib import Path

    import bentoml
    import yaml

    defaults = Path(bentoml.__file__).parent / "_internal" / "configuration" / "v2" / "default_configuration.yaml"
    traffic = yaml.safe_load(defaults.read_text())["services"]["traffic"]
    assert set(traffic) == {"timeout", "max_concurrency"}


def test_transformers_private_trainer_methods_still_match_the_overrides():
    """When this fails, transformers renamed or changed a private Trainer method that
    castbot.compat.transformers_fixes.TrainerHooks overrides: the override would silently stop running."""
    from castbot.compat.transformers_fixes import trainer_private_changes

    assert trainer_private_changes() == []


def test_model_card_round_trips_and_refuses_unknown_or_missing_fields(tmp_path):
    import json

    import pydantic

    from castbot.model.dialogue import DialogueFormat
    from castbot.model.folder import CARD_FILE, ModelCard, read_card

    assert read_card(tmp_path) is None  # a plain base model folder
    card = ModelCard(format=DialogueFormat("chat", "Rick", "Rick and Morty"), max_length=96, base_model="smollm2-135m")
    card.save(tmp_path)
    assert read_card(tmp_path) == card
    assert json.loads((tmp_path / CARD_FILE).read_text())["base_model"] == "smollm2-135m"  # the on-disk key
    with pytest.raises(pydantic.ValidationError, match="base_model"):
        ModelCard(format=DialogueFormat(), max_length=96)
    with pytest.raises(pydantic.ValidationError, match="trained_on"):
        ModelCard(format=DialogueFormat(), max_length=96, base_model=None, trained_on="x")
    (tmp_path / CARD_FILE).write_text(json.dumps({"format": {}, "max_length": 96}))
    with pytest.raises(pydantic.ValidationError, match="base_model"):
        read_card(tmp_path)


def test_openai_stop_strings_are_cut_in_a_stream_without_sending_a_partial_stop():
    from castbot.serve.openai_protocol import StopCutter, cut_at_stop

    cutter = StopCutter(["END"])
    sent = [cutter.feed(piece) for piece in ["hello E", "N", "D and more"]]
    assert "".join(sent) == "hello " and cutter.stopped and cutter.flush() == ""
    cutter = StopCutter(["END"])
    assert "".join([cutter.feed("ab E"), cutter.feed("x")]) + cutter.flush() == "ab Ex"
    assert cut_at_stop("a. b", [".", "b"]) == ("a", True) and cut_at_stop("ab", ["x"]) == ("ab", False)


def test_telegram_replies_are_split_at_telegrams_limit():
    from castbot.telegram import TELEGRAM_LIMIT, split_message

    text = ("word " * 2000).strip()
    pieces = split_message(text)
    assert len(pieces) == 3 and all(len(p) <= TELEGRAM_LIMIT for p in pieces)
    assert " ".join(pieces) == text and split_message("short") == ["short"]


def test_bentoml_still_wraps_a_4xx_error_body_in_a_list():
    """When this fails, BentoML fixed its stray trailing comma: castbot.compat.bentoml_fixes.UnwrappedErrors can go."""
    import inspect

    from _bentoml_impl.server.app import ServiceAppFactory

    assert 'detail = ({"error": str(exc)},)' in inspect.getsource(ServiceAppFactory.api_endpoint_wrapper)


def test_bentoml_cork_dispatcher_still_has_what_the_adaptive_engine_uses():
    """castbot.compat.bentoml_fixes.cork_dispatcher builds BentoML's internal CorkDispatcher by these names and reads its
    loop task as `_controller`: when this fails, BentoML moved its adaptive batching."""
    import inspect

    from bentoml._internal.marshal.dispatcher import CorkDispatcher

    parameters = inspect.signature(CorkDispatcher.__init__).parameters
    assert {"max_latency_in_ms", "max_batch_size", "fallback", "get_batch_size"} <= set(parameters)
    assert "self._controller" in inspect.getsource(CorkDispatcher.__init__)
    assert "self._controller" in inspect.getsource(CorkDispatcher.__call__)
