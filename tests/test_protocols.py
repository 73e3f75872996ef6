"""Every protocol takes the one request path: the same good and bad inputs, sent through
`/predict`, KServe v1, the Open Inference Protocol in JSON and in binary over HTTP, and over
gRPC, come to the same outcome, each in its own protocol's words."""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from gpuserve.config import ModelSettings, Settings

from .helpers import DEMO, FAKE_SPEC, Both, FakeModel, both, fake_loader

pytestmark = pytest.mark.anyio

LIMIT = 2  # instances per request
SETTINGS = Settings(
    device="cpu",
    model=ModelSettings(path=DEMO, name="fake", max_instances_per_request=LIMIT, freeze_gc=False),
)

# How each protocol words an outcome, written out here rather than read from the server's
# own table, so that a wrong entry there fails.
WORDS: dict[str, dict[Any, str]] = {
    "predict": {200: "ok", 422: "invalid", 404: "not found"},
    "v1": {200: "ok", 422: "invalid", 404: "not found"},
    "v2 json": {200: "ok", 400: "invalid", 404: "not found"},
    "v2 binary": {200: "ok", 400: "invalid", 404: "not found"},
    "grpc": {"OK": "ok", "INVALID_ARGUMENT": "invalid", "NOT_FOUND": "not found"},
}


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    rows: list[list[float]]
    outcome: str  # "ok", "invalid", "not found"


CASES = [
    Case("one instance", "fake", [[1, 2, 3, 4]], "ok"),
    Case("two instances", "fake", [[1, 2, 3, 4], [-1, 0, 0.5, 2]], "ok"),
    Case("too narrow", "fake", [[1, 2, 3]], "invalid"),
    Case("too wide", "fake", [[1, 2, 3, 4, 5]], "invalid"),
    Case("past the spec's range", "fake", [[1000, 0, 0, 0]], "invalid"),
    Case("past the instance limit", "fake", [[1, 1, 1, 1]] * (LIMIT + 1), "invalid"),
    Case("no such model", "nope", [[1, 2, 3, 4]], "not found"),
]


@dataclass
class Result:
    outcome: str
    values: list[float] | None  # one per instance, when answered


def _flat(rows: list[list[float]]) -> list[float]:
    return [value for row in rows for value in row]


def _width(rows: list[list[float]]) -> int:
    return len(rows[0])


async def via_predict(servers: Both, case: Case) -> Result:
    response = await servers.http.post(
        f"/models/{case.model}/predict", json={"instances": case.rows}
    )
    values = (
        [float(np.ravel(v)[0]) for v in response.json()["outputs"]] if response.is_success else None
    )
    return Result(WORDS["predict"][response.status_code], values)


async def via_v1(servers: Both, case: Case) -> Result:
    response = await servers.http.post(
        f"/v1/models/{case.model}:predict", json={"instances": case.rows}
    )
    ok = response.is_success
    values = [float(np.ravel(v)[0]) for v in response.json()["predictions"]] if ok else None
    return Result(WORDS["v1"][response.status_code], values)


def _v2_values(body: dict[str, Any]) -> list[float]:
    (output,) = body["outputs"]
    return [float(v) for v in output["data"]]


async def via_v2_json(servers: Both, case: Case) -> Result:
    tensor = {
        "name": "x",
        "datatype": "FP32",
        "shape": [len(case.rows), _width(case.rows)],
        "data": _flat(case.rows),
    }
    response = await servers.http.post(f"/v2/models/{case.model}/infer", json={"inputs": [tensor]})
    values = _v2_values(response.json()) if response.is_success else None
    return Result(WORDS["v2 json"][response.status_code], values)


async def via_v2_binary(servers: Both, case: Case) -> Result:
    data = struct.pack(f"<{len(_flat(case.rows))}f", *_flat(case.rows))
    tensor = {
        "name": "x",
        "datatype": "FP32",
        "shape": [len(case.rows), _width(case.rows)],
        "parameters": {"binary_data_size": len(data)},
    }
    header = json.dumps({"inputs": [tensor]}).encode()
    response = await servers.http.post(
        f"/v2/models/{case.model}/infer",
        content=header + data,
        headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(header)),
        },
    )
    values = _v2_values(response.json()) if response.is_success else None
    return Result(WORDS["v2 binary"][response.status_code], values)


async def via_grpc(servers: Both, case: Case) -> Result:
    request = pb.ModelInferRequest(
        model_name=case.model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="x", datatype="FP32", shape=[len(case.rows), _width(case.rows)]
            )
        ],
        raw_input_contents=[np.asarray(case.rows, dtype="<f4").tobytes()],
    )
    try:
        reply = await servers.stub.ModelInfer(request)
    except grpc.aio.AioRpcError as exc:
        return Result(WORDS["grpc"][exc.code().name], None)
    values = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").tolist()
    return Result(WORDS["grpc"]["OK"], [float(v) for v in values])


PROTOCOLS: dict[str, Callable[[Both, Case], Any]] = {
    "predict": via_predict,
    "v1": via_v1,
    "v2 json": via_v2_json,
    "v2 binary": via_v2_binary,
    "grpc": via_grpc,
}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def servers() -> AsyncIterator[Both]:
    async with both(SETTINGS, loader=fake_loader(FakeModel(FAKE_SPEC))) as found:
        yield found


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_every_protocol_comes_to_the_same_outcome(servers: Both, case: Case) -> None:
    results = {name: await send(servers, case) for name, send in PROTOCOLS.items()}
    outcomes = {name: result.outcome for name, result in results.items()}
    assert set(outcomes.values()) == {case.outcome}, outcomes
    if case.outcome == "ok":
        expected = [float(np.float32(sum(row))) for row in case.rows]
        for name, result in results.items():
            assert result.values == pytest.approx(expected), name
