"""The Open Inference Protocol over gRPC, on a real socket, with Triton's own gRPC client
(tritonclient.grpc.aio) and with the raw stub where a client cannot send what is tested."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as triton
from sklearn.datasets import load_digits
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from gpuserve.config import ModelSettings, Settings
from gpuserve.core.errors import DeadlineExceeded, InvalidInput, NotReady, Overloaded, Unauthorized
from gpuserve.grpc.server import status_of
from gpuserve.handler import softmax

from .helpers import (
    FAKE,
    FAKE_SPEC,
    KEY,
    ONE,
    Both,
    FakeModel,
    ServerProcess,
    both,
    fake_loader,
    metric,
    read_all,
    send_all,
    slow_server,
    wait_ready,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def digits(demo_model: Path) -> AsyncIterator[Both]:
    model = ModelSettings(path=demo_model, freeze_gc=False, max_instances_per_request=16)
    async with both(Settings(device="cpu", model=model)) as servers:
        yield servers


def images(n: int) -> np.ndarray[Any, Any]:
    return load_digits().data[:n].astype(np.float32)


def pixels(batch: np.ndarray[Any, Any], datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput("pixels", list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch)
    return tensor


async def failure(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        await call
    return caught.value


async def test_health_and_metadata(digits: Both) -> None:
    assert await digits.grpc.is_server_live()
    assert await digits.grpc.is_server_ready()
    assert await digits.grpc.is_model_ready("digits")
    assert await digits.grpc.is_model_ready("digits", "1")
    server = await digits.grpc.get_server_metadata(as_json=True)
    http_server = (await digits.http.get("/v2")).json()
    assert server["name"] == "gpuserve" and server["extensions"] == http_server["extensions"]
    meta = await digits.grpc.get_model_metadata("digits", as_json=True)
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert meta["outputs"][0]["name"] == "logits" and meta["versions"] == ["1"]
    config = (await digits.grpc.get_model_config("digits", as_json=True))["config"]
    http_config = (await digits.http.get("/v2/models/digits/config")).json()
    assert config["max_batch_size"] == http_config["max_batch_size"]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    # A question, not an error, as Triton answers it: the model is not ready.
    assert await digits.grpc.is_model_ready("nope") is False
    assert await digits.grpc.is_model_ready("digits", "2") is False
    version = await failure(digits.grpc.get_model_metadata("digits", "2"))
    assert version.status() == "StatusCode.NOT_FOUND"


async def test_raw_contents_give_the_numbers_of_the_http_routes(digits: Both) -> None:
    batch = images(5)
    result = await digits.grpc.infer("digits", [pixels(batch)], request_id="g1")
    logits = result.as_numpy("logits")
    assert logits.shape == (5, 10) and logits.dtype == np.float32
    assert result.get_response().id == "g1"
    body = {"inputs": [{"name": "pixels", "shape": [5, 64], "datatype": "FP32"}]}
    body["inputs"][0]["data"] = batch.ravel().tolist()
    v2 = (await digits.http.post("/v2/models/digits/infer", json=body)).json()
    np.testing.assert_allclose(logits.ravel(), v2["outputs"][0]["data"], atol=1e-6)
    predicted = await digits.http.post("/predict", json={"instances": batch.tolist()})
    probabilities = [out["probabilities"] for out in predicted.json()["outputs"]]
    np.testing.assert_allclose(softmax(logits), probabilities, atol=1e-6)


async def test_typed_contents_are_read_like_raw_ones(digits: Both) -> None:
    batch = images(2)
    tensor = pb.ModelInferRequest().InferInputTensor(name="pixels", datatype="FP32", shape=[2, 64])
    tensor.contents.fp32_contents.extend(batch.ravel().tolist())
    typed = await digits.stub.ModelInfer(pb.ModelInferRequest(model_name="digits", inputs=[tensor]))
    raw = await digits.grpc.infer("digits", [pixels(batch)])
    assert typed.outputs[0].shape == [2, 10] and typed.outputs[0].datatype == "FP32"
    got = np.frombuffer(typed.raw_output_contents[0], dtype="<f4").reshape(2, 10)
    np.testing.assert_array_equal(got, raw.as_numpy("logits"))
    # No id given: the request's own id comes back, as over HTTP.
    assert typed.id


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t, r: setattr(t, "datatype", "FP64"), "datatype must be FP32"),
        (lambda t, r: t.shape.__setitem__(1, 63), "do not fit shape [2, 63]"),
        (lambda t, r: setattr(t, "name", "image"), "unknown input 'image'"),
        (lambda t, r: r.raw_input_contents.__setitem__(0, b"\0" * 8), "8 bytes of raw"),
        (lambda t, r: r.raw_input_contents.append(b"\0"), "raw_input_contents has 2 entries"),
        (lambda t, r: r.parameters["priority"].int64_param.__int__(), "'priority'"),
        (lambda t, r: t.parameters["shared_memory_region"].string_param.upper(), "'shared"),
        (lambda t, r: t.parameters["binary_data_size"].int64_param.__int__(), "not the 512"),
        (lambda t, r: r.parameters["timeout"].CopyFrom(pb.InferParameter(int64_param=-1)), "tim"),
        (lambda t, r: r.outputs.add(name="probabilities"), "unknown output 'probabilities'"),
        (lambda t, r: t.contents.fp32_contents.append(1.0), "raw_input_contents or typed"),
    ],
)
async def test_bad_requests_are_invalid_argument_naming_the_problem(
    digits: Both, change: Any, expected: str
) -> None:
    tensor = pb.ModelInferRequest().InferInputTensor(name="pixels", datatype="FP32", shape=[2, 64])
    request = pb.ModelInferRequest(model_name="digits", inputs=[tensor])
    request.raw_input_contents.append(images(2).tobytes())
    change(request.inputs[0], request)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await digits.stub.ModelInfer(request, metadata=(("x-request-id", "bad-1"),))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert expected in (caught.value.details() or "")
    assert "(request id bad-1)" in (caught.value.details() or "")
    # The server goes on serving.
    assert (await digits.grpc.infer("digits", [pixels(images(1))])).as_numpy("logits").shape


async def test_non_finite_and_out_of_range_values_are_refused(digits: Both) -> None:
    batch = images(1)
    batch[0, 3] = np.nan
    refused = await failure(digits.grpc.infer("digits", [pixels(batch)]))
    assert refused.status() == "StatusCode.INVALID_ARGUMENT" and "NaN" in str(refused.message())


async def test_unknown_model_and_version_are_not_found(digits: Both) -> None:
    unknown = await failure(digits.grpc.infer("nope", [pixels(images(1))]))
    assert unknown.status() == "StatusCode.NOT_FOUND"
    version = await failure(digits.grpc.infer("digits", [pixels(images(1))], model_version="3"))
    assert version.status() == "StatusCode.NOT_FOUND" and "no version '3'" in str(version.message())


async def test_classification_comes_back_as_strings(digits: Both) -> None:
    wanted = triton.InferRequestedOutput("logits", class_count=3)
    result = await digits.grpc.infer("digits", [pixels(images(2))], outputs=[wanted])
    classes = result.as_numpy("logits")
    assert classes.shape == (2, 3)
    logits = (await digits.grpc.infer("digits", [pixels(images(2))])).as_numpy("logits")
    for row, top in zip(logits, classes, strict=True):
        indices = [int(entry.decode().split(":")[1]) for entry in top]
        assert indices == list(np.argsort(-row, kind="stable")[:3])


async def test_calls_are_counted_and_in_statistics(digits: Both) -> None:
    await digits.grpc.infer("digits", [pixels(images(2))])
    await failure(digits.grpc.infer("digits", [pixels(images(1).astype(np.float64), "FP64")]))
    text = (await digits.http.get("/metrics")).text
    route = 'route="/inference.GRPCInferenceService/ModelInfer"'
    assert (
        f'gpuserve_requests_total{{code="OK",model="digits",'
        f'protocol="grpc",{route},version="1"}} 1.0' in text
    )
    invalid = 'code="INVALID_ARGUMENT",model="digits",protocol="grpc"'
    assert f'gpuserve_requests_total{{{invalid},{route},version="1"}} 1.0' in text
    stats = await digits.grpc.get_inference_statistics("digits", as_json=True)
    (entry,) = stats["model_stats"]
    assert entry["inference_stats"]["success"]["count"] == "1"
    assert entry["inference_stats"]["fail"]["count"] == "1"
    assert entry["inference_count"] == "2"


@pytest.mark.parametrize("size", [100, 400_000])  # below and past parse_offload_bytes
async def test_bytes_that_are_no_message_are_invalid_argument_and_counted(
    digits: Both, size: int
) -> None:
    garbage = b"\xff" * size
    async with grpc.aio.insecure_channel(digits.url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await infer(garbage, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a ModelInferRequest" in (caught.value.details() or "")
    assert "request id" in (caught.value.details() or "")
    text = (await digits.http.get("/metrics")).text
    assert 'code="INVALID_ARGUMENT",model="",protocol="grpc"' in text
    assert await digits.grpc.is_model_ready("digits")


async def test_a_call_outside_what_is_served_is_unimplemented(digits: Both) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await digits.stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert await digits.grpc.is_server_live()


async def test_api_keys_are_read_from_the_authorization_metadata(fake_model: FakeModel) -> None:
    settings = Settings(device="cpu", model=FAKE, api_keys=[KEY])
    async with both(settings, loader=fake_loader(fake_model)) as servers:
        assert await servers.grpc.is_server_live()  # probes need no key
        x = triton.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
        refused = await failure(servers.grpc.infer("fake", [x]))
        assert refused.status() == "StatusCode.UNAUTHENTICATED"
        wrong = await failure(
            servers.grpc.infer("fake", [x], headers={"authorization": "Bearer no"})
        )
        assert wrong.status() == "StatusCode.UNAUTHENTICATED"
        meta = await failure(servers.grpc.get_model_metadata("fake"))
        assert meta.status() == "StatusCode.UNAUTHENTICATED"
        good = {"authorization": f"Bearer {KEY}"}
        result = await servers.grpc.infer("fake", [x], headers=good)
        assert result.as_numpy("y").tolist() == [4.0]


async def test_the_deadline_of_a_call_is_the_deadline_of_its_request(
    fake_model: FakeModel,
) -> None:
    fake_model.delay_s = 0.5
    async with both(Settings(device="cpu", model=FAKE), loader=fake_loader(fake_model)) as servers:
        x = triton.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
        # The client's own deadline (the gRPC deadline) ...
        late = await failure(servers.grpc.infer("fake", [x], client_timeout=0.1))
        assert late.status() == "StatusCode.DEADLINE_EXCEEDED"
        # ... and the protocol's timeout parameter, in microseconds, answered by the server.
        timed = await failure(servers.grpc.infer("fake", [x], timeout=100_000))
        assert timed.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert "deadline" in str(timed.message())
        fake_model.delay_s = 0
        assert (await servers.grpc.infer("fake", [x])).as_numpy("y").tolist() == [4.0]


async def test_each_version_is_reached_by_its_number_and_the_highest_without_one() -> None:
    def load(model: ModelSettings, device: Any) -> FakeModel:
        return FakeModel(FAKE_SPEC, scale=float(model.version))

    versions = [FAKE.model_copy(update={"version": v}) for v in (1, 2)]
    async with both(Settings(device="cpu", models=versions), loader=load) as servers:
        x = triton.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
        for asked, version, value in (("1", "1", 4.0), ("2", "2", 8.0), ("", "2", 8.0)):
            result = await servers.grpc.infer("fake", [x], model_version=asked)
            assert result.as_numpy("y").tolist() == [value]
            assert result.get_response().model_version == version
        meta = await servers.grpc.get_model_metadata("fake", as_json=True)
        assert meta["versions"] == ["1", "2"]
        stats = await servers.grpc.get_inference_statistics("fake", as_json=True)
        counts = {s["version"]: s.get("inference_count", "0") for s in stats["model_stats"]}
        assert counts == {"1": "1", "2": "2"}
        one = await servers.grpc.get_inference_statistics("fake", "1", as_json=True)
        assert [s["version"] for s in one["model_stats"]] == ["1"]
        config = await servers.grpc.get_model_config("fake", "1", as_json=True)
        assert config["config"]["version_policy"] == {"specific": {"versions": ["1", "2"]}}
        missing = await failure(servers.grpc.infer("fake", [x], model_version="3"))
        assert missing.status() == "StatusCode.NOT_FOUND" and "loaded: 1, 2" in missing.message()


class Gated(FakeModel):
    """The first batch holds the worker until the test lets it go, so later arrivals queue."""

    def __init__(self) -> None:
        super().__init__(FAKE_SPEC)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, instances: list[np.ndarray[Any, Any]]) -> list[Any]:
        if not self.batches:
            self.entered.set()
            self.gate.wait(timeout=30)
        return super().__call__(instances)


async def test_grpc_and_http_requests_share_batches() -> None:
    gated = Gated()
    model = FAKE.model_copy(update={"max_batch_size": 16, "max_wait_ms": 60_000, "warmup": False})
    async with both(Settings(device="cpu", model=model), loader=fake_loader(gated)) as servers:

        async def over_grpc(value: float) -> float:
            x = triton.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(np.full((1, 4), value, dtype=np.float32))
            return float((await servers.grpc.infer("fake", [x])).as_numpy("y")[0])

        async def over_http(value: float) -> float:
            response = await servers.http.post("/predict", json={"inputs": [value] * 4})
            return float(response.json()["outputs"])

        blocker = asyncio.ensure_future(over_http(100))
        assert await asyncio.to_thread(gated.entered.wait, 10)  # the worker holds it
        calls = [asyncio.ensure_future(over_grpc(i) if i % 2 else over_http(i)) for i in range(8)]
        with anyio.fail_after(10):  # until all eight wait behind the held batch
            while (
                'gpuserve_queue_depth{model="fake",version="1"} 8.0'
                not in (await servers.http.get("/metrics")).text
            ):
                await asyncio.sleep(0.01)
        gated.gate.set()
        assert await blocker == 400.0
        assert await asyncio.gather(*calls) == [4.0 * i for i in range(8)]  # each its own
        assert gated.batches == [1, 8]  # one forward pass for both protocols


async def test_repository_calls_follow_the_http_ones(fake_model: FakeModel) -> None:
    settings = Settings(device="cpu", model=FAKE, repository_api=True)
    async with both(settings, loader=fake_loader(fake_model)) as servers:
        index = await servers.grpc.get_model_repository_index(as_json=True)
        assert index["models"] == [{"name": "fake", "version": "1", "state": "READY"}]
        await servers.grpc.unload_model("fake")
        assert not await servers.grpc.is_server_ready()
        await servers.grpc.load_model("fake")
        assert await servers.grpc.is_model_ready("fake")
        unknown = await failure(servers.grpc.load_model("../etc/passwd"))
        assert unknown.status() == "StatusCode.NOT_FOUND"


async def test_the_repository_calls_are_off_by_default(digits: Both) -> None:
    off = await failure(digits.grpc.get_model_repository_index())
    assert off.status() == "StatusCode.NOT_FOUND" and "repository_api" in str(off.message())


def test_each_error_has_its_grpc_status() -> None:
    assert status_of(InvalidInput("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(Unauthorized("x")) == grpc.StatusCode.UNAUTHENTICATED
    assert status_of(NotReady("x")) == grpc.StatusCode.UNAVAILABLE
    assert status_of(Overloaded("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(DeadlineExceeded("x")) == grpc.StatusCode.DEADLINE_EXCEEDED


# A real `gpuserve serve` process: the CLI's gRPC listener, its stop, and its errors.


def test_sigterm_answers_every_grpc_and_http_call_in_flight_then_exits_0(slow_model: Path) -> None:
    import tritonclient.grpc as triton_sync

    with slow_server(slow_model, model__max_batch_size="4") as server:
        wait_ready(server.url)
        grpc_calls = 12
        client = triton_sync.InferenceServerClient(server.grpc_url)
        meta = client.get_model_metadata("slow", as_json=True)
        output = meta["outputs"][0]["name"]
        x = triton_sync.InferInput(meta["inputs"][0]["name"], [1, 64], "FP32")
        x.set_data_from_numpy(np.ones((1, 64), dtype=np.float32))
        results: list[Any] = []
        done = threading.Event()

        def answered(result: Any, error: Any) -> None:
            results.append(error if error is not None else result.as_numpy(output).shape)
            if len(results) == grpc_calls:
                done.set()

        for _ in range(grpc_calls):
            client.async_infer("slow", [x], answered)
        http_connections = send_all(server.url, [ONE] * 8)
        deadline = time.monotonic() + 30
        # The metrics request itself is in flight too.
        while metric(server.url, "gpuserve_requests_in_flight") < grpc_calls + 8 + 1:
            assert time.monotonic() < deadline, "the calls never all arrived"
            time.sleep(0.01)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        assert done.wait(timeout=60)
        assert results == [(1, 10)] * grpc_calls
        assert [status for status, _ in read_all(http_connections)] == [200] * 8
        assert server.process.wait(timeout=30) == 0
        client.close()


def test_a_grpc_port_in_use_stops_the_server_with_a_clear_error(demo_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "gpuserve", "serve", str(demo_model), "--device", "cpu"]
        result = subprocess.run(
            [*command, "--port", "0", "--grpc-port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    assert f"gRPC cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "grpc = false" in result.stderr


def test_grpc_off_serves_http_only(demo_model: Path) -> None:
    with ServerProcess(
        str(demo_model), "--device", "cpu", env={"GPUSERVE_GRPC": "false"}
    ) as server:
        wait_ready(server.url)
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
        assert server.stop() == 0
    assert not any("gRPC running" in line for line in server.log)


# KServe's own gRPC client. Its copy of the protocol's messages registers the same names as
# tritonclient's, and protobuf refuses both in one process: it runs in a process of its own.

KSERVE_CLIENT = """
import asyncio, json, sys
import grpc, numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

async def main(url, key, batch):
    client = InferenceGRPCClient(url, timeout=30)
    good = (("authorization", "Bearer " + key),)
    out = {"live": await client.is_server_live(), "ready": await client.is_server_ready()}
    typed = InferInput("pixels", list(batch.shape), "FP32", data=batch.ravel().tolist())
    raw = InferInput("pixels", list(batch.shape), "FP32")
    raw.set_data_from_numpy(batch, binary_data=True)
    for name, tensor in (("typed", typed), ("raw", raw)):
        request = InferRequest("digits", [tensor], request_id=name)
        response = await client.infer(request, headers=good)
        (output,) = response.outputs
        out[name] = [response.id, output.name, list(output.shape), output.as_numpy().tolist()]
    wrong = InferInput("pixels", [1, 63], "FP32", data=[0.0] * 63)
    for name, request, metadata in (
        ("no_key", InferRequest("digits", [typed]), ()),
        ("bad_shape", InferRequest("digits", [wrong]), good),
        ("unknown", InferRequest("nope", [typed]), good),
    ):
        try:
            await client.infer(request, headers=metadata)
            out[name] = ["OK", ""]
        except grpc.aio.AioRpcError as exc:
            out[name] = [exc.code().name, exc.details()]
    await client.close()
    print(json.dumps(out))

batch = np.array(json.loads(sys.argv[3]), dtype=np.float32)
asyncio.run(main(sys.argv[1], sys.argv[2], batch))
"""


def test_kserve_grpc_client_against_the_server(demo_model: Path) -> None:
    env = {"GPUSERVE_API_KEYS": KEY}
    with ServerProcess(str(demo_model), "--device", "cpu", env=env) as server:
        wait_ready(server.url)
        batch = images(3)
        body = {"inputs": [{"name": "pixels", "shape": [3, 64], "datatype": "FP32"}]}
        body["inputs"][0]["data"] = batch.ravel().tolist()
        headers = {"authorization": f"Bearer {KEY}"}
        v2 = httpx.post(f"{server.url}/v2/models/digits/infer", json=body, headers=headers)
        expected = np.array(v2.json()["outputs"][0]["data"]).reshape(3, 10)
        command = [sys.executable, "-c", KSERVE_CLIENT, server.grpc_url, KEY]
        result = subprocess.run(
            [*command, json.dumps(batch.tolist())], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        assert out["live"] and out["ready"]
        for name in ("typed", "raw"):
            response_id, output, shape, values = out[name]
            assert (response_id, output, shape) == (name, "logits", [3, 10])
            np.testing.assert_allclose(values, expected, atol=1e-6)
        assert out["no_key"][0] == "UNAUTHENTICATED"
        assert out["bad_shape"][0] == "INVALID_ARGUMENT" and "shape [63]" in out["bad_shape"][1]
        assert out["unknown"][0] == "NOT_FOUND" and "'nope'" in out["unknown"][1]
        assert server.stop() == 0


async def test_each_call_has_a_request_id_and_an_access_log_line(
    digits: Both, caplog: pytest.LogCaptureFixture
) -> None:
    tensor = pb.ModelInferRequest().InferInputTensor(name="pixels", datatype="FP32", shape=[1, 64])
    request = pb.ModelInferRequest(model_name="digits", inputs=[tensor])
    request.raw_input_contents.append(images(1).tobytes())
    with caplog.at_level(logging.INFO, logger="gpuserve.access"):
        call = digits.stub.ModelInfer(request, metadata=(("x-request-id", "mine-1"),))
        answer = await call
        trailing = dict(await call.trailing_metadata() or ())
        fresh = digits.stub.ModelInfer(request)
        await fresh
        generated = dict(await fresh.trailing_metadata() or ())["x-request-id"]
    assert answer.id == "mine-1" and trailing["x-request-id"] == "mine-1"
    assert generated and generated != "mine-1"
    lines = [r for r in caplog.records if r.name == "gpuserve.access"]
    assert len(lines) == 2
    first = lines[0]
    assert first.getMessage().startswith("GRPC /inference.GRPCInferenceService/ModelInfer OK ")
    assert first.request_id == "mine-1" and first.model == "digits"  # type: ignore[attr-defined]
    assert first.batch_size >= 1  # type: ignore[attr-defined]


async def test_a_failing_model_is_internal_with_a_request_id_and_the_server_goes_on(
    fake_model: FakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    async with both(Settings(device="cpu", model=FAKE), loader=fake_loader(fake_model)) as servers:
        x = triton.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
        fake_model.error = RuntimeError("the model broke")
        failed = await failure(servers.grpc.infer("fake", [x], request_id="f1"))
        assert failed.status() == "StatusCode.INTERNAL"
        assert "(request id " in str(failed.message())
        assert "the model broke" not in str(failed.message())  # the log has it, not the client
        assert "the model broke" in caplog.text
        fake_model.error = None
        assert (await servers.grpc.infer("fake", [x])).as_numpy("y").tolist() == [4.0]


async def test_calls_gpuserve_does_not_serve_say_so_without_a_traceback(
    digits: Both, caplog: pytest.LogCaptureFixture
) -> None:
    refusals = [
        digits.stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()),
        digits.stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest()),
        digits.stub.TraceSetting(pb.TraceSettingRequest()),
        digits.stub.LogSettings(pb.LogSettingsRequest()),
    ]
    for call in refusals:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "not served by gpuserve" in str(refused.value.details())
    stream = digits.stub.ModelStreamInfer(iter([pb.ModelInferRequest(model_name="digits")]))
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for _ in stream:
            pass
    assert streamed.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert not [r for r in caplog.records if r.exc_info is not None]


async def test_a_priority_over_grpc_reaches_the_model_s_levels(digits: Both) -> None:
    pixels = triton.InferInput("pixels", [1, 64], "FP32")
    pixels.set_data_from_numpy(np.zeros((1, 64), np.float32))
    # The demo model has no priority levels: a priority is refused, saying so; 0 is the default.
    with pytest.raises(InferenceServerException, match="has no priority levels"):
        await digits.grpc.infer("digits", [pixels], priority=1)
    answer = await digits.grpc.infer("digits", [pixels], priority=0)
    assert answer.as_numpy("logits").shape == (1, 10)
