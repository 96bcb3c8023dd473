"""The OpenVINO export a Bento build places beside the model: a clear error for a model the exporter cannot read,
the exported weights score as the torch model does, int8 is kept only within the perplexity limit, and a build
without the exporter fails or goes on as asked."""

import pytest

from tests.conftest import WORDS

pytestmark = pytest.mark.unit


def test_a_model_the_exporter_cannot_read_is_a_clear_error_before_any_request(tmp_path):
    from castbot.serve.engines import EngineError
    from tasks.release.openvino_export import export_openvino

    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(EngineError, match="OpenVINO export of .* failed"):
        export_openvino(tmp_path, "fp32")


SCORED = [{"context": ["The rocket needs fuel."], "speakers": ["Bram"], "episode": "E1",
           "response": " ".join(WORDS[:20])},
          {"context": ["Moon tonight?"], "speakers": ["Cleo"], "episode": "E2", "response": "Never."},
          {"context": ["Ready?", "Almost."], "speakers": ["Cleo", "Bram"], "episode": "E3",
           "response": " ".join(WORDS[5:14])}]


def test_the_exported_model_scores_as_the_torch_model_does(eos_bot):
    """The served weights' perplexity (tasks.release.openvino_export.exported_losses) on the fp32 export equals the
    torch model's own per-sample losses."""
    from tasks.evaluate.perplexity import encode_samples
    from tasks.release.openvino_export import export_openvino, exported_losses

    encoded = encode_samples(eos_bot, SCORED, 96)
    exported = exported_losses(export_openvino(eos_bot.folder, "fp32"), encoded)
    assert [n for _, n in exported] == [n for _, n in eos_bot.score(encoded)]
    assert [loss for loss, _ in exported] == pytest.approx([loss for loss, _ in eos_bot.score(encoded)], rel=1e-3)


def test_a_build_keeps_int8_weights_only_within_the_perplexity_limit(eos_bot, tmp_path):
    """registry.openvino auto: int8 when its measured test perplexity is within the limit, else fp32 (both on
    record in the export's card)."""
    import shutil

    from castbot.serve.engines.openvino import built_export, read_built_card
    from tasks.evaluate.perplexity import EvalSet, measure_perplexity
    from tasks.release.bento import TestSplit, export_for_cpu

    own = measure_perplexity(eos_bot, EvalSet.encode(SCORED, eos_bot, 96)).perplexity
    cards = {}
    for limit in (1.0, 0.0):  # a 100 % rise allowed, then none
        folder = tmp_path / f"limit-{limit}"
        shutil.copytree(eos_bot.folder, folder)
        export_for_cpu(folder, "auto", TestSplit(SCORED, 96, own), limit)
        cards[limit] = read_built_card(folder)
        assert built_export(folder) == folder / "openvino"
    generous, strict = cards[1.0], cards[0.0]
    assert generous["weights"] == "int8" and generous["reference_perplexity"] == own
    int8 = generous["int8_test_perplexity"]
    assert int8 == pytest.approx(own, rel=0.5) and strict["int8_test_perplexity"] == pytest.approx(int8)
    if int8 > own:  # int8 rounding almost always costs a little: the strict build keeps fp32
        assert strict["weights"] == "fp32" and "exceeds the 0.0% limit" in strict["reason"]
        assert strict["fp32_test_perplexity"] == pytest.approx(own, rel=1e-3)
        sizes = {limit: (tmp_path / f"limit-{limit}" / "openvino" / "openvino_model.bin").stat().st_size
                 for limit in cards}
        assert sizes[1.0] < sizes[0.0]  # the int8 file is the smaller
    else:
        assert strict["weights"] == "int8"


def test_a_build_without_the_exporter_fails_when_openvino_is_asked_for_and_goes_on_under_auto(eos_bot, tmp_path,
                                                                                           monkeypatch, caplog):
    import shutil

    from castbot.serve.engines import EngineError
    from castbot.serve.engines.openvino import built_export
    from tasks.release.bento import export_for_cpu

    folder = tmp_path / "model"
    shutil.copytree(eos_bot.folder, folder)
    (folder / "generation_config.json").write_text('{"max_new_tokens": 7}')  # content no export is cached for
    monkeypatch.setenv("CASTBOT_OPENVINO_EXPORTER", str(tmp_path / "no-such-python"))
    with pytest.raises(EngineError, match="no OpenVINO exporter at .*no-such-python"):
        export_for_cpu(folder, "int8", None, 0.01)
    assert export_for_cpu(folder, "auto", None, 0.01) is None  # the Bento serves with the continuous engine
    assert "no OpenVINO exporter" in caplog.text and built_export(folder) is None
