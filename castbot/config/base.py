"""The base of every config model: unknown keys are refused. Imports only pydantic, so the service can use it."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A pydantic model that refuses keys it does not define (a typo in a profile or a request fails, naming it)."""

    model_config = ConfigDict(extra="forbid")
