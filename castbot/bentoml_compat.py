"""Workarounds for BentoML behaviour, each in one named function with the version and the upstream behaviour.

tests/test_units.py checks that each upstream behaviour is still there: when BentoML changes, that test fails
and the workaround can go.
"""

import json

from pydantic import BaseModel


def keep_self_session(service) -> None:
    """Keep the in-process client that /chat uses to call /generate on one session for the process's life.

    BentoML 1.4.39-1.4.40 (`_bentoml_impl.client.proxy2.SessionManager(max_age=300, max_requests=100)`) replaces
    that aiohttp session every 100 calls or 300 s and closes the old one under the calls still in flight on it:
    they fail with 'Server disconnected' (a 500 to the user) at every 100th chat under load.
    """
    manager = getattr(getattr(getattr(service, "__self_proxy__", None), "_async", None), "_session_manager", None)
    if manager is not None and manager.max_requests != float("inf"):
        manager.max_requests = manager.max_age = float("inf")


def as_model(result, model: type[BaseModel]) -> BaseModel:
    """An API result as the pydantic model it was returned as.

    BentoML 1.4 hands a service's call of its own batchable API back as the model, a dict or a JSON string,
    depending on whether the call went in-process or through the HTTP proxy.
    """
    if isinstance(result, model):
        return result
    return model.model_validate(result if isinstance(result, dict) else json.loads(result))
