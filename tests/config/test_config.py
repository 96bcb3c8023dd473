"""castbot/config.py: profiles load, name a bad key with its line, and fill defaults from the method."""

import textwrap

import pytest

from castbot.config.profile import ConfigError, load_profile

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
