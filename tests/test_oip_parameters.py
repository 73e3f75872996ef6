"""Request parameters: the supported ones act, the protocol's defaults are the absence they
mean, Triton's reserved `triton_` ones pass, and anything else is refused by name."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpuserve.core.errors import InvalidInput
from gpuserve.protocols import oip
from gpuserve.spec import ModelSpec, TensorSpec

SPEC = ModelSpec(name="n", input=TensorSpec(name="x", shape=(4,)), output=TensorSpec(shape=(1,)))


def decode(parameters: dict[str, Any]) -> oip.InferRequest:
    body = {
        "parameters": parameters,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
    }
    return oip.decode_request(json.dumps(body).encode(), SPEC, 8)


def test_the_protocols_defaults_and_tritons_reserved_parameters_are_accepted() -> None:
    decoded = decode(
        {
            "priority": 0,
            "sequence_id": 0,
            "sequence_start": False,
            "sequence_end": False,
            "timeout": 0,
            "triton_enable_empty_final_response": True,
        }
    )
    assert len(decoded.instances) == 1 and decoded.timeout_s is None
    assert decode({"sequence_id": ""}).timeout_s is None


@pytest.mark.parametrize(
    "parameters",
    [
        {"priority": False},  # not an integer
        {"priority": -1},
        {"priority": "1"},
        {"sequence_id": 4},
        {"sequence_start": True},
        {"sequence_end": 0},
        {"tritonic": 1},  # not the reserved prefix
    ],
)
def test_a_parameter_that_asks_for_something_unsupported_is_refused(
    parameters: dict[str, Any],
) -> None:
    (name,) = parameters
    with pytest.raises(InvalidInput, match=repr(name)):
        decode(parameters)


def test_the_priority_parameter_is_read_for_the_service_to_check() -> None:
    assert decode({}).priority is None
    assert decode({"priority": 0}).priority == 0  # the model's default level
    assert decode({"priority": 3}).priority == 3
