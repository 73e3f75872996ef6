"""Request and response bodies of the HTTP API, as pydantic models (they also feed OpenAPI)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PredictRequest(BaseModel):
    """One instance under `inputs`, or several under `instances`; exactly one of the two."""

    model_config = ConfigDict(extra="forbid")

    inputs: Any = Field(default=None, description="One instance, shaped as the model's input.")
    instances: list[Any] | None = Field(
        default=None, description="Several instances; each is batched on its own."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> PredictRequest:
        # Presence, not value, decides: {"inputs": null, "instances": [...]} is two fields.
        if len(self.model_fields_set & {"inputs", "instances"}) != 1:
            raise ValueError("give exactly one of 'inputs' (one instance) or 'instances' (a list)")
        if "instances" in self.model_fields_set and not self.instances:
            raise ValueError("'instances' must be a non-empty list")
        return self


class V1PredictRequest(BaseModel):
    """KServe's v1 body: a list of instances, under `instances` (rows) or `inputs`."""

    model_config = ConfigDict(extra="forbid")

    instances: list[Any] | None = Field(default=None, description="The instances, one per row.")
    inputs: list[Any] | None = Field(default=None, description="The same, under v1's other name.")

    @model_validator(mode="after")
    def _exactly_one(self) -> V1PredictRequest:
        given = self.model_fields_set & {"inputs", "instances"}
        if len(given) != 1:
            raise ValueError("give exactly one of 'instances' or 'inputs', a list of instances")
        (name,) = given
        if not getattr(self, name):
            raise ValueError(f"'{name}' must be a non-empty list")
        return self

    @property
    def rows(self) -> list[Any]:
        rows = self.instances if self.instances is not None else self.inputs
        assert rows is not None
        return rows


class PredictResponse(BaseModel):
    """For `inputs`, `outputs` is that instance's output; for `instances`, a list of them."""

    model: str
    outputs: Any


class ErrorResponse(BaseModel):
    """Every error the server returns has this shape."""

    error: str
    request_id: str
