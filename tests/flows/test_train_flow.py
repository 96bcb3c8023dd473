"""The training flow end to end under a Prefect test server, with a real SQLite MLflow registry."""

import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.conftest import REPO, tiny_config, write_tiny_show

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_harness")]


def champion_version(name: str) -> str | None:
    from tasks.release.registry import champion_version as registry_champion

    return registry_champion(name)  # None only for "no such model / no alias"; other registry errors raise


def test_first_run_promotes_and_identical_rerun_does_not(tmp_path):
    from flows.train import train

    data = write_tiny_show(tmp_path / "show.csv")
    config = tiny_config(data, **{"registry.model_name": "rerun-bot"})

    first = train(config)
    assert first["promoted"], first["reason"]
    assert first["version"] == "1"
    assert champion_version("rerun-bot") == "1"

    version = MlflowClient().get_model_version("rerun-bot", "1")
    assert len(version.tags["castbot.data_sha256"]) == 64
    assert version.tags["castbot.config_sha256"] == config.digest()
    assert version.tags["castbot.git_commit"] != ""
    assert float(version.tags["gate.candidate"]) == pytest.approx(first["perplexity"])

    second = train(config)
    assert not second["promoted"] and second["version"] == "2"
    assert "does not beat the champion" in second["reason"]
    assert champion_version("rerun-bot") == "1"
    run = MlflowClient().get_run(second["run_id"])
    assert run.data.tags["gate.promote"] == "False"
    assert run.data.metrics["test_perplexity_champion"] == pytest.approx(first["perplexity"], rel=1e-3)


def test_candidate_above_the_limit_is_registered_but_never_champion(tmp_path):
    from flows.train import train

    config = tiny_config(write_tiny_show(tmp_path / "show.csv"),
                         **{"registry.model_name": "strict-bot", "gate.max_perplexity": 1.5})
    result = train(config)
    assert not result["promoted"] and "above the limit" in result["reason"]
    assert champion_version("strict-bot") is None


def test_a_run_that_fails_after_the_gate_leaves_the_champion_alone(tmp_path, monkeypatch):
    """The Bento build fails after a promoting gate: the run fails and the alias stays on version 1."""
    import flows.train
    from flows.train import train

    config = tiny_config(write_tiny_show(tmp_path / "show.csv"), **{"registry.model_name": "late-failure-bot"})
    assert train(config)["promoted"]
    # the same model again, with the improvement and noise tests off so that the gate promotes it
    better = config.model_copy(update={"gate": config.gate.model_copy(update={"min_improvement": 0.0,
                                                                              "noise_confidence": 0.0}),
                                       "registry": config.registry.model_copy(update={"build_bento": True})})

    def broken_build(*args, **kwargs):
        raise RuntimeError("bentoml build failed")

    monkeypatch.setattr(flows.train, "build_bento", broken_build)  # fault injection, not a stand-in for BentoML
    with pytest.raises(RuntimeError, match="bentoml build failed"):
        train(better)
    assert champion_version("late-failure-bot") == "1"
    [failed] = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("castbot").experiment_id],
        filter_string="tags.`gate.promote` = 'True' and attributes.status = 'FAILED' "
                      "and attributes.run_name = 'late-failure-bot-train'")
    assert failed.info.status == "FAILED"


def test_promotion_is_refused_when_the_champion_moved_during_the_run():
    from mlflow import MlflowClient

    from tasks.release.registry import promote_champion

    client = MlflowClient()
    client.create_registered_model("moved-bot")
    for _ in range(3):
        client.create_model_version("moved-bot", source="file:///nonexistent")
    client.set_registered_model_alias("moved-bot", "champion", "2")  # another run promoted v2 meanwhile
    with pytest.raises(RuntimeError, match="the champion moved from version 1 to 2"):
        promote_champion.fn("moved-bot", "3", measured_champion="1")
    assert champion_version("moved-bot") == "2"


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "transcript not found"),
        ("empty", "the file is empty"),
        ("no_column", "mapped column(s) missing: line -> 'line'"),
        ("absent_character", "character 'Ada' speaks 0 line(s)"),
        ("cp1252", "not UTF-8"),
    ],
)
def test_bad_data_fails_before_training_and_registers_nothing(tmp_path, case, message):
    import pandas as pd

    from castbot.common.errors import DataError
    from flows.train import train

    path = tmp_path / "show.csv"
    if case == "empty":
        path.write_text("")
    elif case == "no_column":
        write_tiny_show(path)
        pd.read_csv(path).rename(columns={"line": "text"}).to_csv(path, index=False)
    elif case == "absent_character":
        write_tiny_show(path)
        frame = pd.read_csv(path)
        frame.loc[frame.speaker == "Ada", "speaker"] = "Zed"
        frame.to_csv(path, index=False)
    elif case == "cp1252":
        write_tiny_show(path)
        path.write_bytes(path.read_bytes().replace(b"rocket", "r\u00f6cket".encode("cp1252")))
    name = f"bad-{case.replace('_', '-')}-bot"
    with pytest.raises(DataError) as error:
        train(tiny_config(path, **{"registry.model_name": name}))
    assert str(path) in str(error.value) and message in str(error.value)
    assert not MlflowClient().search_model_versions(f"name='{name}'")


def test_a_bad_second_transcript_fails_before_training_and_names_its_file(tmp_path):
    import pandas as pd
    import yaml

    from castbot.common.errors import DataError
    from flows.train import train

    more = write_tiny_show(tmp_path / "more.csv")
    pd.read_csv(more).rename(columns={"line": "text"}).to_csv(more, index=False)
    profile = tmp_path / "more.yaml"
    profile.write_text(yaml.safe_dump(tiny_config(more).model_dump(mode="json")))
    config = tiny_config(write_tiny_show(tmp_path / "show.csv"),
                         **{"registry.model_name": "bad-more-bot", "data.also_train_on": [str(profile)]})
    with pytest.raises(DataError) as error:
        train(config)
    assert str(more) in str(error.value) and "mapped column(s) missing: line -> 'line'" in str(error.value)
    assert not MlflowClient().search_model_versions("name='bad-more-bot'")


def test_a_form_config_naming_another_characters_profile_is_refused(tmp_path):
    """The Prefect form skips load_profile: the flow itself checks data.also_train_on."""
    from castbot.config.profile import ConfigError
    from flows.train import train

    show = write_tiny_show(tmp_path / "show.csv")
    profile = tmp_path / "bram.yaml"
    profile.write_text(f"data: {{path: {show}}}\ncharacter: Bram\n")
    config = tiny_config(show, **{"registry.model_name": "form-more-bot", "data.also_train_on": [str(profile)]})
    with pytest.raises(ConfigError, match="names a profile of 'Bram', not 'Ada'"):
        train(config)
    assert not MlflowClient().search_model_versions("name='form-more-bot'")


def test_cli_reports_a_bad_profile_key_and_exits_non_zero(tmp_path):
    profile = tmp_path / "bad.yaml"
    profile.write_text("data: {path: show.csv}\ncharacter: Ada\ntraining: {epochs: 0}\n")
    result = subprocess.run([sys.executable, "-m", "flows.train", str(profile)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "training.epochs: Input should be greater than 0" in result.stderr


def test_a_llama_chat_model_trains_with_lora_end_to_end_and_mlflow_loads_the_version(tmp_path):
    """The SmolLM2 layout in miniature (Llama blocks, ChatML template, <|im_end|> = pad = eos): chat format,
    LoRA on every linear layer, adapters registered with their base named, and MLflow's own loader replies."""
    from pathlib import Path

    import mlflow

    from flows.train import train

    config = tiny_config(write_tiny_show(tmp_path / "show.csv"), show="The Tiny Show",
                         **{"registry.model_name": "llama-bot", "offline_model.architecture": "llama",
                            "training.method": "lora", "training.learning_rate": 0.01, "gate.max_perplexity": 1e5,
                            "dialogue.max_length": 160, "offline_model.n_positions": 256})
    result = train(config)
    assert result["promoted"], result["reason"]
    run = MlflowClient().get_run(result["run_id"])
    assert run.data.metrics["test_word_perplexity_candidate"] > 0
    model_dir = mlflow.artifacts.download_artifacts(f"models:/llama-bot/{result['version']}", dst_path=str(tmp_path))
    files = {p.name for p in Path(model_dir).rglob("*")}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files and "castbot.json" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], "logged from code, not pickled"
    replies = mlflow.pyfunc.load_model(f"models:/llama-bot/{result['version']}").predict(["the rocket", "fuel?"])
    assert len(replies) == 2 and all(isinstance(r, str) and "<|im_" not in r for r in replies)


def test_a_candidate_that_loops_is_refused_for_degeneracy(tmp_path, monkeypatch):
    """Fault injection at the decoder: every reply loops; the judge and the gate run as in production."""
    import tasks.evaluate.judge
    from castbot.model.bot import Reply
    from flows.train import train

    def looping(bot, contexts, seed):
        return [Reply("the moon the moon the moon the moon", 5, 12, False) for _ in contexts]

    monkeypatch.setattr(tasks.evaluate.judge, "generate_replies", looping)
    result = train(tiny_config(write_tiny_show(tmp_path / "show.csv"), **{"registry.model_name": "loop-bot"}))
    assert not result["promoted"] and "repeating a 3-gram" in result["reason"] and "1.000" in result["reason"]
    artifacts = {a.path for a in MlflowClient().list_artifacts(result["run_id"])}
    assert "replies.md" in artifacts
    assert champion_version("loop-bot") is None


def feedback_rows(run_id: str) -> list[dict]:
    """The run's feedback.jsonl artifact, one dict per line."""
    import json

    import mlflow

    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="feedback.jsonl")
    with open(path, encoding="utf-8") as rows:
        return [json.loads(line) for line in rows]


def test_a_profile_with_data_feedback_trains_on_the_liked_turn_only(tmp_path):
    """One liked, one disliked and one unrated turn of this bot, and a liked turn of another bot. Before review the
    liked turn is not trained on (feedback.jsonl holds no row, the flow says one awaits review); approved with the
    real review command, the next run trains on it, cleaned, with the history that produced the reply, and records
    its count and digest; validation and test stay the transcript's."""
    from datetime import UTC, datetime

    from castbot.chatlog.store import ChatLog, TurnRecord
    from flows.train import train
    from tasks.data.feedback import feedback_digest
    from tests.chatlog.conftest import cli
    from tests.conftest import run_data_steps

    url = f"sqlite:///{tmp_path / 'chatlog.db'}"
    log = ChatLog(url)
    history = [("", "Is the rocket fuelled?"), ("Ada", "<i>Half</i> of it.")]  # markup the cleaning step strips
    ratings = {"liked": 1, "disliked": -1, "unrated": None, "other-bot": 1}
    for name, rating in ratings.items():
        log.record(TurnRecord(name, f"conversation-{name}", datetime.now(UTC), "chat",
                              f"Is the rocket ready, {name}?", f"The numbers say {name}.", 2,
                              "rival-bot" if name == "other-bot" else "feedback-bot", "1", "Ada", "transformers",
                              12, 5, 0.2, None, "stop", client="alice", history=history))
        if rating:
            assert log.add_feedback(name, rating, None, client="alice")
    log.close()

    data = write_tiny_show(tmp_path / "show.csv")
    config = tiny_config(data, **{"registry.model_name": "feedback-bot",
                                  "data.feedback": {"enabled": True, "url": url}})
    transcript = run_data_steps(config, tmp_path / "docs")

    before = train(config)
    run = MlflowClient().get_run(before["run_id"])
    assert feedback_rows(before["run_id"]) == []  # awaiting review: not trained on
    assert int(run.data.params["samples.train"]) == len(transcript["train"])
    assert (run.data.params["feedback.added"], run.data.params["feedback.pending"]) == ("0", "1")
    assert before["feedback"].startswith("0 feedback samples added to training, 1 liked turns await review")

    approved = cli("review", "--approve", "liked", url=url)  # python -m castbot.chatlog review --approve liked
    assert approved.returncode == 0 and "approved 1 turns" in approved.stdout, approved.stderr

    after = train(config)
    run = MlflowClient().get_run(after["run_id"])
    [row] = feedback_rows(after["run_id"])
    context = ["Is the rocket fuelled?", "Half of it.", "Is the rocket ready, liked?"]  # history, then the message
    assert row == {"turn_id": "liked", "client": "alice", "episode": "feedback:conversation-liked",
                   "context": context, "speakers": ["", "Ada", ""], "response": "The numbers say liked."}
    assert int(run.data.params["samples.train"]) == len(transcript["train"]) + 1
    assert int(run.data.params["samples.train_feedback"]) == 1
    assert (run.data.params["feedback.added"], run.data.params["feedback.pending"]) == ("1", "0")
    assert after["feedback"].startswith("1 feedback samples added to training, 0 liked turns await review")
    for split in ("validation", "test"):
        assert int(run.data.params[f"samples.{split}"]) == len(transcript[split])
    liked = {"turn_id": "liked", "context": context, "response": "The numbers say liked."}
    assert run.data.tags["castbot.feedback_digest"] == feedback_digest([liked])
    assert MlflowClient().get_model_version("feedback-bot", after["version"]).tags[
        "castbot.feedback_digest"] == feedback_digest([liked])  # the version names the feedback it saw
