"""The `/predict` and KServe v1 codecs: a JSON body to checked instances.

Pure functions of the body, the spec and the instance limit, so that the core may run them
inline or in a parse process (`core.offload`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from gpuserve.core.errors import InvalidInput, describe_validation
from gpuserve.protocols.schemas import PredictRequest, V1PredictRequest
from gpuserve.spec import Instance, ModelSpec, to_instance, to_instances


@dataclass(frozen=True, slots=True)
class PredictBody:
    """A decoded `/predict` body: its instances, and whether it held one (`inputs`)."""

    instances: list[Instance]
    single: bool
    # Neither protocol carries a deadline or a priority in its body (they are headers).
    timeout_s: None = None
    priority: None = None


def decode_predict(body: bytes, spec: ModelSpec, limit: int) -> PredictBody:
    """Parse a `/predict` body and check it against the spec; InvalidInput (422) if it fails."""
    try:
        parsed = PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidInput(describe(exc)) from None
    if parsed.instances is not None:
        if len(parsed.instances) > limit:
            raise InvalidInput(f"instances: {len(parsed.instances)} given, at most {limit} allowed")
        return PredictBody(to_instances(parsed.instances, spec, "instances"), single=False)
    return PredictBody([to_instance(parsed.inputs, spec, "inputs")], single=True)


def decode_v1(body: bytes, spec: ModelSpec, limit: int) -> PredictBody:
    """Parse a KServe v1 `:predict` body; InvalidInput (422) if it fails."""
    try:
        parsed = V1PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidInput(describe(exc)) from None
    rows = parsed.rows
    field = "instances" if parsed.instances is not None else "inputs"
    if len(rows) > limit:
        raise InvalidInput(f"{field}: {len(rows)} given, at most {limit} allowed")
    return PredictBody(to_instances(rows, spec, field), single=False)


# A body with thousands of bad values would otherwise get a message listing each of them.
_MAX_ERRORS_SHOWN = 5


def describe(exc: ValidationError) -> str:
    """A validation error in a few words: where and what, for the first few problems."""
    return describe_validation(exc, "body", _MAX_ERRORS_SHOWN)
