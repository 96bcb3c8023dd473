"""castbot/compat/bentoml_fixes.py sentinels: each fails when BentoML changes what a workaround relies on."""

import pytest

pytestmark = pytest.mark.unit


def test_bentoml_traffic_settings_still_lack_what_the_admission_middleware_adds():
    """When this fails, BentoML's traffic settings gained a body limit or more: service.py's Admission may shrink."""
    from pathlib import Path

    import bentoml
    import yaml

    defaults = Path(bentoml.__file__).parent / "_internal" / "configuration" / "v2" / "default_configuration.yaml"
    traffic = yaml.safe_load(defaults.read_text())["services"]["traffic"]
    assert set(traffic) == {"timeout", "max_concurrency"}


def test_bentoml_still_wraps_a_4xx_error_body_in_a_list():
    """When this fails, BentoML fixed its stray trailing comma: castbot.compat.bentoml_fixes.UnwrappedErrors can go."""
    import inspect

    from _bentoml_impl.server.app import ServiceAppFactory

    assert 'detail = ({"error": str(exc)},)' in inspect.getsource(ServiceAppFactory.api_endpoint_wrapper)


def test_bentoml_cork_dispatcher_still_has_what_the_adaptive_engine_uses():
    """castbot.compat.bentoml_fixes.cork_dispatcher builds BentoML's internal CorkDispatcher by these names and reads
    its loop task as `_controller`: when this fails, BentoML moved its adaptive batching."""
    import inspect

    from bentoml._internal.marshal.dispatcher import CorkDispatcher

    parameters = inspect.signature(CorkDispatcher.__init__).parameters
    assert {"max_latency_in_ms", "max_batch_size", "fallback", "get_batch_size"} <= set(parameters)
    assert "self._controller" in inspect.getsource(CorkDispatcher.__init__)
    assert "self._controller" in inspect.getsource(CorkDispatcher.__call__)
