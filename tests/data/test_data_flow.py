"""The data steps inside the real flow: reuse on rerun, lineage in MLflow and Prefect, any language."""

import pytest

from tests.conftest import run_data_steps, tiny_config, write_tiny_show

pytestmark = pytest.mark.flow


def task_states(flow_state) -> dict[str, str]:
    """Task name -> state name ('Completed', 'Cached', ...) for one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


@pytest.fixture(scope="module")
def reruns(prefect_harness, tmp_path_factory):
    """The tiny show trained three times: once, again unchanged, then with another cleaning setting."""
    from flows.train import train

    # 7 episodes: content no other test uses, so the first run starts with a cold cache
    data = write_tiny_show(tmp_path_factory.mktemp("show") / "show.csv", episodes=7)
    config = tiny_config(data, **{"registry.model_name": "cache-bot"})
    changed = tiny_config(data, **{"registry.model_name": "cache-bot", "cleaning.duplicates": "all"})
    return [train(c, return_state=True) for c in (config, config, changed)]


def test_unchanged_rerun_reuses_cleaned_and_tokenised_data(reruns):
    first, second, changed = (task_states(state) for state in reruns)
    assert first["clean_transcript"] == "Completed" and first["tokenize_dialogues"] == "Completed"
    assert second["clean_transcript"] == "Cached" and second["tokenize_dialogues"] == "Cached"
    assert changed["clean_transcript"] == "Completed"  # another cleaning config invalidates the cache


def test_run_names_its_cleaned_dataset_and_keeps_the_reports(reruns):
    from mlflow import MlflowClient

    client = MlflowClient()
    result = reruns[0].result()
    run = client.get_run(result["run_id"])
    [dataset_input] = run.inputs.dataset_inputs
    digest = run.data.tags["castbot.cleaned_data_digest"]
    assert dataset_input.dataset.digest == digest and dataset_input.dataset.name == "show-cleaned"
    version = client.get_model_version(result["model_name"], result["version"])
    assert version.tags["castbot.cleaned_data_digest"] == digest  # the model version names the data it saw
    logged = {f.path for f in client.list_artifacts(result["run_id"], "data_reports")}
    assert {"data_reports/cleaning_report.md", "data_reports/raw_transcript", "data_reports/dialogue"} <= logged
    pages = [f.path for f in client.list_artifacts(result["run_id"], "data_reports/dialogue")]
    assert "data_reports/dialogue/index.html" in pages


def test_prefect_run_links_the_cleaning_report_and_data_docs(reruns):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flow_run_id = reruns[0].state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key = {a.key: a.data for a in artifacts}
    assert "| rule | rows touched | characters |" in by_key["cleaning-report"]
    for suite in ("raw-transcript", "dialogue"):
        assert "passed" in by_key[f"validation-{suite}"] and "file://" in by_key[f"validation-{suite}"]


def test_russian_dialogue_end_to_end(prefect_harness, tmp_path):
    import mlflow

    from castbot.model.folder import load_tokenizer
    from flows.train import train

    config = tiny_config("chatterbot:russian", character="Bot", **{"registry.model_name": "russian-bot",
                                                                    "validation.min_character_lines": 30})
    result = train(config)
    assert result["version"] == "1" and result["promoted"]
    mlflow.artifacts.download_artifacts(artifact_uri="models:/russian-bot@champion", dst_path=str(tmp_path))
    tokenizer = load_tokenizer(str(next(tmp_path.rglob("tokenizer.json")).parent))  # the registered model's
    text = "Доброе утро! Как дела? Ёжик съел щи."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_a_second_transcript_trains_too_and_is_logged_as_a_training_input(prefect_harness, tmp_path):
    import pandas as pd
    import yaml
    from mlflow import MlflowClient

    from flows.train import train
    from tasks.data.ingest import file_sha256
    from tests.conftest import CHARACTER

    main = write_tiny_show(tmp_path / "show.csv", episodes=6)
    more = tmp_path / "more.csv"
    pd.DataFrame([{"episode": f"X{e}", "scene": "0", "speaker": CHARACTER if i % 2 else "Bram",
                   "line": f"Episode {e} brings line {i} of a new adventure"}
                  for e in range(4) for i in range(10)]).to_csv(more, index=False)
    profile = tmp_path / "more.yaml"
    profile.write_text(yaml.safe_dump(tiny_config(more).model_dump(mode="json")))
    result = train(tiny_config(main, **{"registry.model_name": "more-bot", "data.also_train_on": [str(profile)]}))

    client = MlflowClient()
    run = client.get_run(result["run_id"])
    assert sorted(d.dataset.name for d in run.inputs.dataset_inputs) == ["more-cleaned", "show-cleaned"]
    assert run.data.tags["castbot.data_sha256"] == file_sha256(str(main))  # the transcript tested on
    assert "castbot.also_train_on.more.cleaned_data_digest" in run.data.tags
    folder = "data_reports/also_train_on/more"
    assert {f"{folder}/cleaning_report.md", f"{folder}/dialogue"} <= {f.path for f in client.list_artifacts(
        result["run_id"], folder)}
    alone = run_data_steps(tiny_config(main), tmp_path / "docs")  # the same data steps without the second file
    assert int(run.data.params["samples.train"]) == len(alone["train"]) + 20  # 4 new episodes x 5 lines of Ada
    for split in ("validation", "test"):
        assert int(run.data.params[f"samples.{split}"]) == len(alone[split])
