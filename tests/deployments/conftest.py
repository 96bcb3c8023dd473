import pytest

from tests.deployments.manifests import OVERLAYS, render


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def rendered(request) -> tuple[str, list[dict]]:
    """(overlay name, its objects as `kubectl kustomize` renders them), for each overlay."""
    return request.param, render(request.param)
