"""The tune: section of a profile: a bad search space is refused at load, naming the key; neither tune: nor
monitor: is part of what a training run reads, so neither moves its digest."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from castbot.config.profile import ConfigError, load_profile
from tests.conftest import REPO, tiny_config

pytestmark = pytest.mark.unit


def profile_with(tmp_path: Path, tune: dict, **overrides) -> Path:
    raw = tiny_config(tmp_path / "show.csv", **overrides).model_dump(mode="json", exclude_unset=True)
    raw["tune"] = tune
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


LR = {"type": "float", "low": 1e-4, "high": 3e-3, "log": True}


@pytest.mark.parametrize("tune, overrides, message", [
    ({"space": {"training.learning_rat": LR}}, {}, "'training.learning_rat' is not a setting a study can vary"),
    ({"space": {"training.learning_rate": {**LR, "low": 1e-2}}}, {}, "empty or inverted range: low 0.01"),
    ({"space": {"training.lora.r": {"type": "categorical", "choices": []}}}, {}, "non-empty 'choices'"),
    ({"space": {"training.learning_rate": {**LR, "high": 5}}}, {},
     "tune.space.training.learning_rate: 'training.learning_rate': 5 is not a valid value"),
    ({"space": {"training.learning_rate": {**LR, "lo": 1e-5}}}, {},
     "tune.space.training.learning_rate.lo: Extra inputs are not permitted"),
    ({"space": {"dialogue.val_fraction": {"type": "float", "low": 0.1, "high": 0.3}}}, {},
     "'dialogue.val_fraction' cannot be searched"),
    ({"space": {"training.max_steps": {"type": "float", "low": 6, "high": 20}}}, {},
     "tune.space.training.max_steps: the setting is a whole number"),
    ({"space": {"training.epochs": {"type": "float", "low": 1, "high": 3}}}, {},
     "tune.space.training.epochs: training.max_steps is 12, which overrides epochs"),
    ({"space": {"training.max_steps": {"type": "int", "low": 3, "high": 20}}}, {},
     "tune.space.training.max_steps: 3 steps end before the first validation"),
    ({"space": {"training.lora.r": {"type": "categorical", "choices": [4, 8]}}}, {},
     "tune.space.training.lora.r: LoRA settings do nothing with training.method full"),
    ({"space": {"training.learning_rate": LR}, "enqueue": [{"training.learning_rate": 0.5}]}, {},
     "tune.enqueue[0].training.learning_rate: 0.5 lies outside its search range"),
    ({"space": {"training.learning_rate": LR}, "enqueue": [{"training.batch_size": 4}]}, {},
     "tune.enqueue[0].training.batch_size: not in the search space"),
    ({"trials": 0}, {}, "tune.trials: Input should be greater than or equal to 1"),
])
def test_a_bad_search_space_is_refused_at_load_naming_the_key(tmp_path, tune, overrides, message):
    with pytest.raises(ConfigError) as error:
        load_profile(profile_with(tmp_path, tune, **overrides))
    assert message in str(error.value)


def test_the_default_space_fits_each_shipped_profile():
    """No profile gives a tune: section: each gets a default space that its own settings validate against."""
    for path in sorted((REPO / "configs").glob("*.yaml")):
        config = load_profile(path)
        space = config.search_space()
        assert "training.learning_rate" in space, path.name
        assert ("training.lora.r" in space) == (config.training.method == "lora"), path.name
        assert ("dialogue.context_turns" in space) == (config.dialogue.loss_on == "response"), path.name
        assert ("training.max_steps" in space) == (config.training.max_steps > 0), path.name


def test_a_trials_settings_apply_as_a_validated_profile(tmp_path):
    from tasks.search.study import apply_settings

    config = load_profile(profile_with(tmp_path, {"space": {"training.learning_rate": LR}}))
    tuned = apply_settings(config, {"training.learning_rate": 2e-3, "dialogue.context_turns": 5})
    assert tuned.training.learning_rate == 2e-3 and tuned.dialogue.context_turns == 5
    assert tuned.training.max_steps == config.training.max_steps  # everything else kept


def test_a_study_continues_across_changes_its_trials_never_use(tmp_path):
    """A new gate or registry setting keeps the study's stored trials; a new training setting starts another."""
    from tasks.search.study import study_name

    config = load_profile(profile_with(tmp_path, {"space": {"training.learning_rate": LR}}))
    same = config.model_copy(update={"gate": config.gate.model_copy(update={"min_improvement": 0.05}),
                                     "registry": config.registry.model_copy(update={"openvino": "off"})})
    other = config.model_copy(update={"training": config.training.model_copy(update={"batch_size": 4})})
    assert study_name(same) == study_name(config)
    assert study_name(other) != study_name(config)


def old_digest(config) -> str:
    """The digest as castbot/config.py computed it before the split: registered champions carry this value."""
    settings = config.model_dump(mode="json", exclude={"monitor", "tune"})
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def test_the_digest_keeps_its_value_for_every_profile(tmp_path):
    """A champion's freshness key (castbot.config_sha256) still matches the same settings after the split."""
    configs = [load_profile(path) for path in sorted((REPO / "configs").glob("*.yaml"))]
    configs.append(load_profile(profile_with(tmp_path, {"space": {"training.learning_rate": LR}, "trials": 3},
                                             **{"monitor.min_turns": 20, "base_model": "offline-tiny"})))
    for config in configs:
        assert config.digest() == old_digest(config), config.model_name


def test_monitor_and_tune_change_no_training_digest_or_param(tmp_path):
    from castbot.config.profile import TrainRunConfig
    from tasks.release.registry import flat_params

    config = load_profile(profile_with(tmp_path, {}))
    other_study = config.model_copy(update={"tune": config.tune.model_copy(update={"trials": 50}),
                                            "monitor": config.monitor.model_copy(update={"min_turns": 7})})
    other_run = config.model_copy(update={"training": config.training.model_copy(update={"batch_size": 4})})
    assert other_study.digest() == config.digest() and other_run.digest() != config.digest()
    params = flat_params(config)
    assert params["training.batch_size"] == "8" and params["character"] == config.character
    assert not [key for key in params if key.startswith(("monitor.", "tune."))]
    assert {key.split(".")[0] for key in params} == set(TrainRunConfig.model_fields) - {"cast"}  # one character


def test_the_served_base_class_loads_nothing_but_pydantic():
    """The Bento ships castbot/config/__init__.py and base.py only (bentofile.yaml): importing Strict must not
    need another config module."""
    code = ("import sys, castbot.config.base; "
            "print(sorted(m for m in sys.modules if m.startswith(('castbot', 'yaml'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.strip() == "['castbot', 'castbot.config', 'castbot.config.base']"
