"""What a request declares is checked against what it carries before anything of the declared
size is made: the Open Inference Protocol's decoders, called directly."""

from __future__ import annotations

import json
import struct
import tracemalloc

import pytest

from gpuserve.core.errors import InvalidInput
from gpuserve.protocols import oip
from gpuserve.spec import ModelSpec, TensorSpec

TEXT = ModelSpec(
    name="text",
    input=TensorSpec(name="text", shape=(), dtype="string"),
    output=TensorSpec(name="y", shape=(2,)),
)
NUMBERS = ModelSpec(name="n", input=TensorSpec(name="x", shape=(4,)), output=TensorSpec(shape=(1,)))


def binary_request(name: str, datatype: str, shape: list[int], data: bytes) -> tuple[bytes, str]:
    tensor = {
        "name": name,
        "datatype": datatype,
        "shape": shape,
        "parameters": {"binary_data_size": len(data)},
    }
    header = json.dumps({"inputs": [tensor]}).encode()
    return header + data, str(len(header))


@pytest.mark.parametrize("shape", [[10**8], [10**12], [2**62]])
def test_a_huge_bytes_shape_in_a_tiny_body_is_refused_before_any_allocation(
    shape: list[int],
) -> None:
    data = struct.pack("<I", 1) + b"a"
    body, header_length = binary_request("text", "BYTES", shape, data)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput, match="cannot hold"):
            oip.decode_request(body, TEXT, None, header_length=header_length)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak  # well under one element's worth of a pointer array


def test_a_tensor_of_too_many_dimensions_is_refused_with_a_clear_message() -> None:
    shape = [1] * 65
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": [1.0]}]}
    ).encode()
    with pytest.raises(InvalidInput, match="65 dimensions; at most 32"):
        oip.decode_request(body, NUMBERS, 8)


def test_a_refusal_names_a_bounded_number_of_unknown_parameters() -> None:
    parameters = {f"p{i}_" + "x" * 10_000: 1 for i in range(1000)}
    body = json.dumps(
        {
            "parameters": parameters,
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1] * 4}],
        }
    ).encode()
    with pytest.raises(InvalidInput) as refused:
        oip.decode_request(body, NUMBERS, 8)
    assert "and 995 more" in refused.value.message
    assert len(refused.value.message) < 1000
