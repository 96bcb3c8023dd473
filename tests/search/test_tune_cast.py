"""A study of a cast profile (one tiny model speaking as Ada, Bram and Cleo): every trial is judged on every member
(the mean of their validation losses), keeps each member's figures in Optuna and MLflow, and the report names them."""

import math
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import tiny_config, write_tiny_show

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_harness")]

CAST = ["Ada", "Bram", "Cleo"]  # Ada says half the tiny show's lines, Bram and Cleo a quarter each
TUNE = {"space": {"training.learning_rate": {"type": "float", "low": 1e-3, "high": 2e-2, "log": True}},
        "enqueue": [{"training.learning_rate": 1e-3}], "trials": 2, "pruner": {"kind": "none"}}


def write_cast_profile(folder: Path) -> Path:
    config = tiny_config(write_tiny_show(folder / "show.csv"), show="The Tiny Show", **{
        "character": None, "cast": CAST, "offline_model.architecture": "llama",  # a cast needs the chat format
        "offline_model.n_positions": 256, "dialogue.max_length": 96, "registry.model_name": "cast-study-bot"})
    raw = config.model_dump(mode="json", exclude_unset=True)
    raw["tune"] = TUNE
    path = folder / "cast-study-bot.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_a_cast_study_judges_every_member_and_reports_each(tmp_path, capsys):
    import optuna

    from castbot.common.settings import STATE_DIR
    from castbot.config.profile import load_profile
    from flows.tune import main

    profile = write_cast_profile(tmp_path)
    assert main([str(profile), "--no-train"]) == 0
    printed = capsys.readouterr().out
    assert "2 trials; best trial" in printed and "validation loss (mean over members)" in printed

    client = MlflowClient()
    experiment = client.get_experiment_by_name("castbot-tune").experiment_id
    [study_run] = client.search_runs([experiment], filter_string="tags.`castbot.role` = 'study' and "
                                                                 "tags.`castbot.cast` = 'Ada,Bram,Cleo'")
    name = study_run.data.tags["castbot.study"]
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{STATE_DIR / 'tune' / 'optuna.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    runs = {r.data.tags["castbot.trial"]: r for r in client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{study_run.info.run_id}'")}
    for trial in trials:
        members = trial.user_attrs["members"]
        assert list(members) == CAST  # every member judged, in cast order
        for figures in members.values():
            assert figures["samples"] > 0 and figures["tokens"] > 0
            assert 1 < figures["perplexity"] < math.inf
            assert figures["loss"] == pytest.approx(math.log(figures["perplexity"]))
        # the objective: each member alike, not the pooled validation loss (where Ada's lines weigh double)
        assert trial.value == pytest.approx(sum(m["loss"] for m in members.values()) / len(CAST))
        run = runs[str(trial.number)].data.metrics
        assert run["members_eval_loss"] == pytest.approx(trial.value)
        assert run["best_eval_loss"] == pytest.approx(trial.user_attrs["pooled_eval_loss"])
        for member, figures in members.items():
            assert run[f"validation_perplexity_{member.lower()}"] == pytest.approx(figures["perplexity"])
    assert trials[0].params["training.learning_rate"] != trials[1].params["training.learning_rate"]
    assert trials[0].user_attrs["members"] != trials[1].user_attrs["members"]  # each trial measured its own model

    # the best trial is the lowest mean, and the study run, the table, the printout and the tuned profile name its
    # members' figures
    best = min(trials, key=lambda t: t.value)
    assert study_run.data.tags["best.trial"] == str(best.number)
    assert study_run.data.metrics["best_members_eval_loss"] == pytest.approx(best.value)
    for member, figures in best.user_attrs["members"].items():
        assert study_run.data.metrics[f"best_validation_perplexity_{member.lower()}"] == pytest.approx(
            figures["perplexity"])
    each = ", ".join(f"{m} {f['perplexity']:.3f}" for m, f in best.user_attrs["members"].items())
    assert f"validation perplexity per member: {each}" in printed
    table = Path(client.download_artifacts(study_run.info.run_id, "trials.md", str(tmp_path))).read_text()
    assert "| validation loss (mean over members) |" in table
    assert "| Ada perplexity | Bram perplexity | Cleo perplexity |" in table
    tuned = tmp_path / "cast-study-bot.tuned.yaml"
    text = tuned.read_text()
    assert "# Objective: mean over the cast members of each member's validation loss, every member counting" in text
    assert f"# Best: trial {best.number}, {best.value:.4f}; validation perplexity per member: Ada " in text
    assert load_profile(tuned).cast == CAST
