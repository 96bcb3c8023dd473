"""The pretrained reference model (SmolLM2, fetched from the package registry) judging a trained bot's replies."""

import pytest
from mlflow import MlflowClient

from tasks.release.registry import champion_version
from tests.conftest import tiny_config, write_tiny_show

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def test_word_salad_is_refused_for_fluency_under_the_pretrained_reference(tmp_path):
    """offline-tiny after a few steps writes word salad; SmolLM2 as the reference model finds it unreadable."""
    from flows.train import train

    config = tiny_config(write_tiny_show(tmp_path / "show.csv"),
                         **{"registry.model_name": "salad-bot", "evaluation.reference_model": "smollm2-135m",
                            "gate.max_reply_perplexity": 1000, "gate.max_perplexity": 1e5})
    result = train(config)
    assert not result["promoted"]
    assert "reply perplexity under the reference model" in result["reason"]
    assert "gate.max_reply_perplexity" in result["reason"]
    metrics = MlflowClient().get_run(result["run_id"]).data.metrics
    assert metrics["test_reply_perplexity_candidate"] > 1000
    assert "test_likeness_candidate" in metrics and "test_distinct2_ratio_candidate" in metrics
    assert champion_version("salad-bot") is None
