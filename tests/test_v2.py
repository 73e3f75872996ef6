"""The Open Inference Protocol routes: in-process for each answer and error, and on a real
socket against the real Triton client (tritonclient[http])."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from sklearn.datasets import load_digits
from tritonclient.utils import InferenceServerException

from gpuserve.config import ModelSettings, Settings
from gpuserve.handler import softmax
from gpuserve.http import create_app

from .helpers import ServerProcess, serving, wait_ready

pytestmark = pytest.mark.anyio


def images(n: int) -> np.ndarray[Any, Any]:
    return load_digits().data[:n].astype(np.float32)


@pytest.fixture
async def client(demo_model: Path) -> AsyncIterator[httpx.AsyncClient]:
    model = ModelSettings(path=demo_model, freeze_gc=False, max_instances_per_request=16)
    async with serving(create_app(Settings(device="cpu", model=model))) as client:
        yield client


def infer_body(batch: np.ndarray[Any, Any], **tensor: Any) -> dict[str, Any]:
    fields = {"name": "pixels", "shape": list(batch.shape), "datatype": "FP32"} | tensor
    if "data" not in fields and "parameters" not in fields:
        fields["data"] = batch.ravel().tolist()
    return {"inputs": [fields]}


async def predicted(client: httpx.AsyncClient, batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    response = await client.post("/predict", json={"instances": batch.tolist()})
    return np.array([out["probabilities"] for out in response.json()["outputs"]])


async def test_server_and_model_metadata(client: httpx.AsyncClient) -> None:
    server = (await client.get("/v2")).json()
    assert server["name"] == "gpuserve" and "binary_tensor_data" in server["extensions"]
    assert (await client.get("/v2/health/live")).status_code == 200
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    meta = (await client.get("/v2/models/digits")).json()
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"][0]["shape"] == [-1, 10] and meta["versions"] == ["1"]
    config = (await client.get("/v2/models/digits/config")).json()
    assert meta["platform"] == config["platform"] == "pytorch_libtorch"  # one name for both
    assert (await client.get("/v2/models/digits/ready")).status_code == 200
    assert (await client.get("/v2/models/digits/versions/1")).json() == meta
    assert (await client.get("/v2/models/digits/versions/2")).status_code == 404
    missing = await client.get("/v2/models/nope/ready")
    assert missing.status_code == 404 and "no model named 'nope'" in missing.json()["error"]


async def test_json_inference_gives_the_numbers_of_predict(client: httpx.AsyncClient) -> None:
    batch = images(3)
    response = await client.post("/v2/models/digits/infer", json={"id": "r1", **infer_body(batch)})
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == "r1" and body["model_name"] == "digits"
    (output,) = body["outputs"]
    assert output["name"] == "logits" and output["datatype"] == "FP32"
    assert output["shape"] == [3, 10]
    got = np.array(output["data"], dtype=np.float32).reshape(3, 10)
    np.testing.assert_allclose(softmax(got), await predicted(client, batch), atol=1e-6)


async def test_v2_returns_the_models_own_tensor_untouched(
    client: httpx.AsyncClient, demo_model: Path
) -> None:
    """The demo model's output is logits: /v2 serves them as the module computes them, and
    only /predict turns them into probabilities."""
    batch = images(5)
    module = torch.export.load(str(demo_model)).module()
    with torch.inference_mode():
        logits = module(torch.from_numpy(batch)).numpy()
    response = await client.post("/v2/models/digits/infer", json=infer_body(batch))
    got = np.array(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(5, 10)
    np.testing.assert_allclose(got, logits, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got.sum(axis=1), 1.0)  # not probabilities


async def test_binary_tensors_in_and_out(client: httpx.AsyncClient) -> None:
    batch = images(4)
    raw = batch.astype("<f4").tobytes()
    header = infer_body(batch, parameters={"binary_data_size": len(raw)})
    header["outputs"] = [{"name": "logits", "parameters": {"binary_data": True}}]
    head = json.dumps(header).encode()
    response = await client.post(
        "/v2/models/digits/infer",
        content=head + raw,
        headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(head)),
        },
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:length])
    (output,) = meta["outputs"]
    assert output["parameters"]["binary_data_size"] == 4 * 10 * 4 and "data" not in output
    got = np.frombuffer(response.content[length:], "<f4").reshape(output["shape"])
    np.testing.assert_allclose(softmax(got), await predicted(client, batch), atol=1e-6)


async def test_each_row_of_a_request_joins_the_batcher_as_an_instance(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/v2/models/digits/infer", json=infer_body(images(5)))
    assert response.status_code == 200
    metrics = (await client.get("/metrics")).text
    assert 'gpuserve_batch_size_sum{model="digits",version="1"} 5.0' in metrics


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"datatype": "INT64"}, "datatype must be FP32"),
        ({"name": "input"}, "unknown input 'input': the model takes 'pixels'"),
        ({"shape": [2, 64]}, r"shape \[2, 64\] needs 128 values, got 64"),
        ({"shape": [1, 8, 8]}, r"expected float32\[64\], got shape \[8, 8\]"),
        ({"data": ["a"] * 64}, "expected float32"),
        ({"shape": "64"}, "shape must be a list"),
        ({"parameters": {"binary_data_size": 256}}, "binary_data_size 256 does not fit"),
        # Element counts that wrap around int64 (2**64 is 0 there) must not reach reshape.
        ({"shape": [2**32, 2**32], "data": []}, "at most 16 allowed"),
        ({"shape": [1, 2**32, 2**32], "data": []}, r"needs 18446744073709551616 values, got 0"),
        ({"shape": [1, 2**63, 2], "data": []}, "needs 18446744073709551616 values"),
        ({"shape": [1, 2**70]}, "shape must be a list of sizes"),  # past u64: a float
        ({"parameters": ["binary_data_size", 256]}, "'parameters' must be an object, not an array"),
        ({"parameters": "x"}, "'parameters' must be an object, not a string"),
        ({"parameters": 3}, "'parameters' must be an object, not a number"),
    ],
)
async def test_bad_tensors_are_clear_400s(
    client: httpx.AsyncClient, tensor: dict[str, Any], message: str
) -> None:
    response = await client.post("/v2/models/digits/infer", json=infer_body(images(1), **tensor))
    assert response.status_code == 400
    assert re.search(message, response.json()["error"])
    assert (await client.get("/health/ready")).status_code == 200


@pytest.mark.parametrize(
    ("content", "headers", "message"),
    [
        (b"{not json", {}, "not valid JSON"),
        (b"[]", {}, "must be a JSON object"),
        (b'{"inputs": []}', {}, "missing input 'pixels'"),
        (b"{}", {"inference-header-content-length": "99"}, "between 1 and the body's 2 bytes"),
        (b"{}", {"x-request-timeout-ms": "soon"}, "X-Request-Timeout-Ms"),
        (b"{}", {"inference-header-content-length": "+2"}, "not '+2'"),
        (b"{}", {"inference-header-content-length": "0_2"}, "not '0_2'"),
        (b'{"parameters": [1]}', {}, "the request: 'parameters' must be an object"),
        (b'{"parameters": true}', {}, "not a boolean"),
    ],
)
async def test_bad_bodies_are_clear_400s(
    client: httpx.AsyncClient, content: bytes, headers: dict[str, str], message: str
) -> None:
    response = await client.post(
        "/v2/models/digits/infer",
        content=content,
        headers={"content-type": "application/json", **headers},
    )
    assert response.status_code == 400 and message in response.json()["error"]


@pytest.mark.parametrize("parameters", [[], "binary", 1.5, True])
async def test_output_parameters_that_are_not_an_object_are_a_400(
    client: httpx.AsyncClient, parameters: Any
) -> None:
    body = infer_body(images(1)) | {"outputs": [{"name": "logits", "parameters": parameters}]}
    response = await client.post("/v2/models/digits/infer", json=body)
    assert response.status_code == 400
    assert "output 'logits': 'parameters' must be an object" in response.json()["error"]


async def test_an_unknown_output_name_is_a_400(client: httpx.AsyncClient) -> None:
    body = infer_body(images(1)) | {"outputs": [{"name": "probabilities"}]}
    response = await client.post("/v2/models/digits/infer", json=body)
    assert response.status_code == 400
    assert "unknown output 'probabilities'" in response.json()["error"]


def test_the_triton_client_round_trips_json_and_binary(demo_model: Path) -> None:
    env = {"GPUSERVE_MODEL__PATH": str(demo_model)}
    with ServerProcess("--device", "cpu", env=env) as server:
        wait_ready(server.url)
        batch = images(6)
        predict = httpx.post(f"{server.url}/predict", json={"instances": batch.tolist()})
        expected = np.array([out["probabilities"] for out in predict.json()["outputs"]])

        client = triton.InferenceServerClient(url=urlsplit(server.url).netloc)
        try:
            assert client.is_server_live() and client.is_server_ready()
            assert client.is_model_ready("digits")
            config = client.get_model_config("digits")
            assert config["max_batch_size"] == 32 and config["input"][0]["dims"] == [64]
            assert client.get_model_config("digits", model_version="1") == config
            every = client.get_inference_statistics()["model_stats"]
            one = client.get_inference_statistics("digits")["model_stats"]
            assert [s["name"] for s in every] == ["digits"] and one[0]["name"] == "digits"
            meta = client.get_model_metadata("digits")
            assert meta["inputs"][0]["name"] == "pixels" and meta["inputs"][0]["shape"] == [-1, 64]
            for binary in (False, True):
                tensor = triton.InferInput("pixels", list(batch.shape), "FP32")
                tensor.set_data_from_numpy(batch, binary_data=binary)
                wanted = triton.InferRequestedOutput("logits", binary_data=binary)
                result = client.infer("digits", [tensor], outputs=[wanted])
                np.testing.assert_allclose(softmax(result.as_numpy("logits")), expected, atol=1e-6)
                top = triton.InferRequestedOutput("logits", binary_data=binary, class_count=3)
                classes = client.infer("digits", [tensor], outputs=[top]).as_numpy("logits")
                assert classes.shape == (6, 3)
                for row, probabilities in zip(classes, expected, strict=True):
                    first = row[0].decode() if isinstance(row[0], bytes) else row[0]
                    _, index, label = first.split(":")
                    assert int(index) == int(np.argmax(probabilities)) and label == index
            # Compressed both ways, as Triton's client asks.
            tensor = triton.InferInput("pixels", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch, binary_data=False)
            wanted = triton.InferRequestedOutput("logits", binary_data=False)
            result = client.infer(
                "digits",
                [tensor],
                outputs=[wanted],
                request_compression_algorithm="gzip",
                response_compression_algorithm="gzip",
            )
            np.testing.assert_allclose(softmax(result.as_numpy("logits")), expected, atol=1e-6)
            stats = client.get_inference_statistics("digits")["model_stats"][0]
            assert stats["inference_count"] >= 12  # 6 rows, JSON and binary
            # Triton's extensions not served say so, to Triton's own client.
            not_served = {
                client.get_system_shared_memory_status: "system shared memory",
                client.get_cuda_shared_memory_status: "CUDA shared memory",
                client.get_log_settings: "logging",
                client.get_trace_settings: "trace",
            }
            for call, extension in not_served.items():
                with pytest.raises(InferenceServerException, match=f"{extension} extension is"):
                    call()
        finally:
            client.close()
        assert server.stop() == 0


async def test_v2_health_is_open_and_the_rest_needs_a_key(demo_model: Path) -> None:
    key = "a-key-of-sixteen-chars"
    model = ModelSettings(path=demo_model, freeze_gc=False)
    app = create_app(Settings(device="cpu", model=model, api_keys=[key]))
    async with serving(app) as client:
        assert (await client.get("/v2/health/ready")).status_code == 200
        assert (await client.get("/v2/models/digits")).status_code == 401
        keyed = await client.get("/v2/models/digits", headers={"authorization": f"Bearer {key}"})
        assert keyed.status_code == 200


def batch_totals(url: str) -> tuple[float, float]:
    """(instances, batches) run so far, from the batch-size histogram."""
    metrics = httpx.get(f"{url}/metrics").text
    total = re.search(r'gpuserve_batch_size_sum\{model="digits",version="1"\} (\S+)', metrics)
    count = re.search(r'gpuserve_batch_size_count\{model="digits",version="1"\} (\S+)', metrics)
    assert total is not None and count is not None
    return float(total.group(1)), float(count.group(1))


def test_v2_and_predict_requests_share_batches_on_a_real_socket(demo_model: Path) -> None:
    """Both protocols feed one batcher: concurrent requests of each get their own answers,
    and batches hold more than one request."""
    env = {"GPUSERVE_MODEL__PATH": str(demo_model), "GPUSERVE_MODEL__MAX_WAIT_MS": "5"}
    batch = images(16)
    with ServerProcess("--device", "cpu", env=env) as server:
        wait_ready(server.url)
        predict = httpx.post(f"{server.url}/predict", json={"instances": batch.tolist()})
        expected = [out["probabilities"] for out in predict.json()["outputs"]]
        requests = []
        for i, image in enumerate(batch):
            if i % 2:
                requests.append(("/predict", {"inputs": image.tolist()}))
            else:
                body = infer_body(image[None]) | {"id": str(i)}
                requests.append(("/v2/models/digits/infer", body))
        address = urlsplit(server.url)
        for _ in range(5):  # bounded: a burst on a loaded machine may arrive one by one
            before = batch_totals(server.url)
            connections = []
            for _request in requests:
                connection = http.client.HTTPConnection(address.hostname or "", address.port)
                connection.connect()
                connections.append(connection)
            for connection, (path, body) in zip(connections, requests, strict=True):
                headers = {"content-type": "application/json"}
                connection.request("POST", path, json.dumps(body), headers)
            for i, connection in enumerate(connections):
                response = connection.getresponse()
                answer = json.loads(response.read())
                connection.close()
                assert response.status == 200, answer
                if i % 2:
                    got = answer["outputs"]["probabilities"]
                else:
                    assert answer["id"] == str(i)
                    got = softmax(np.array(answer["outputs"][0]["data"], dtype=np.float32))
                np.testing.assert_allclose(got, expected[i], atol=1e-6)
            after = batch_totals(server.url)
            instances, batches = after[0] - before[0], after[1] - before[1]
            assert instances == len(requests)  # one row each, whichever the protocol
            if batches < instances:
                break
        else:
            pytest.fail("no batch held more than one instance in five bursts")
        assert server.stop() == 0


def _numbers(text: str) -> list[str]:
    return re.findall(r"-?\d+\.\d+(?:[eE][-+]?\d+)?", text)


async def test_both_protocols_print_float32_values_at_float32_precision(
    client: httpx.AsyncClient,
) -> None:
    """0.99999976, not 0.9999997615814209: the shortest text that reads back as the same
    float32, under /predict as under /v2."""
    batch = images(4)
    predict = await client.post("/predict", json={"instances": batch.tolist()})
    v2 = await client.post("/v2/models/digits/infer", json=infer_body(batch))
    for response in (predict, v2):
        numbers = _numbers(response.text)
        assert len(numbers) >= 40
        digits = [text.lstrip("-").split("e")[0].split("E")[0].replace(".", "") for text in numbers]
        # float32 needs at most 9 significant digits; float64's repr of one gives up to 17.
        assert max(len(d.lstrip("0")) for d in digits) <= 9, numbers


async def test_the_model_config_is_triton_s_form(client: httpx.AsyncClient) -> None:
    config = (await client.get("/v2/models/digits/config")).json()
    assert config["name"] == "digits" and config["max_batch_size"] == 32
    assert config["input"] == [{"name": "pixels", "data_type": "TYPE_FP32", "dims": [64]}]
    assert config["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}]
    batching = config["dynamic_batching"]
    assert batching["max_queue_delay_microseconds"] == 2000
    assert 1 <= batching["preferred_batch_size"][0] <= 32  # tuned at load
    assert config["instance_group"] == [{"name": "digits_0", "kind": "KIND_CPU", "count": 1}]
    assert (await client.get("/v2/models/digits/versions/1/config")).json() == config
    assert (await client.get("/v2/models/digits/versions/2/config")).status_code == 404
    assert (await client.get("/v2/models/nope/config")).status_code == 404


async def test_server_metadata_lists_exactly_the_extensions_served(
    client: httpx.AsyncClient,
) -> None:
    server = (await client.get("/v2")).json()
    assert server["extensions"] == [
        "binary_tensor_data",
        "classification",
        "model_configuration",
        "parameters",
        "statistics",
    ]


async def test_the_response_id_is_the_clients_or_the_requests_own(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/v2/models/digits/infer", json=infer_body(images(1)))
    assert response.json()["id"] == response.headers["x-request-id"]
    for bad in (7, None, ["a"], {"a": 1}):
        body = {"id": bad, **infer_body(images(1))}
        refused = await client.post("/v2/models/digits/infer", json=body)
        if bad is None:  # JSON null: as if absent
            assert refused.status_code == 200
            continue
        assert refused.status_code == 400 and "'id' must be a string" in refused.json()["error"]


@pytest.mark.parametrize(
    ("where", "parameter"),
    [
        ("request", {"sequence_id": 4}),
        ("request", {"sequence_start": True}),
        ("request", {"sequence_end": True}),
        ("output", {"shared_memory_region": "r1"}),
        ("input", {"shared_memory_region": "r0"}),
    ],
)
async def test_a_parameter_gpuserve_does_not_act_on_is_refused_by_name(
    client: httpx.AsyncClient, where: str, parameter: dict[str, Any]
) -> None:
    body = infer_body(images(1))
    if where == "request":
        body["parameters"] = parameter
    elif where == "output":
        body["outputs"] = [{"name": "logits", "parameters": parameter}]
    else:
        body["inputs"][0]["parameters"] = parameter
    response = await client.post("/v2/models/digits/infer", json=body)
    assert response.status_code == 400
    (name,) = parameter
    assert f"parameter {name!r} is not supported" in response.json()["error"]


async def test_the_timeout_parameter_is_the_requests_deadline(client: httpx.AsyncClient) -> None:
    body = infer_body(images(1)) | {"parameters": {"timeout": 1}}  # one microsecond
    expired = await client.post("/v2/models/digits/infer", json=body)
    assert expired.status_code == 504
    body["parameters"] = {"timeout": 10_000_000}
    assert (await client.post("/v2/models/digits/infer", json=body)).status_code == 200
    body["parameters"] = {"timeout": 0}  # the protocol's default: no deadline of its own
    assert (await client.post("/v2/models/digits/infer", json=body)).status_code == 200
    for bad in (-5, 1.5, "10", True, False):
        body["parameters"] = {"timeout": bad}
        refused = await client.post("/v2/models/digits/infer", json=body)
        assert refused.status_code == 400 and "'timeout'" in refused.json()["error"]


async def test_an_outputs_own_binary_data_false_wins_over_the_requests_default(
    client: httpx.AsyncClient,
) -> None:
    body = infer_body(images(2)) | {
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "logits", "parameters": {"binary_data": False}}],
    }
    response = await client.post("/v2/models/digits/infer", json=body)
    assert response.status_code == 200
    assert "inference-header-content-length" not in response.headers
    assert len(response.json()["outputs"][0]["data"]) == 20
    body["outputs"] = [{"name": "logits"}]  # no word of its own: the request's default
    binary = await client.post("/v2/models/digits/infer", json=body)
    assert "inference-header-content-length" in binary.headers


async def test_statistics_count_what_metrics_count(client: httpx.AsyncClient) -> None:
    for n in (3, 1, 2):
        assert (
            await client.post("/v2/models/digits/infer", json=infer_body(images(n)))
        ).status_code == 200
    bad = infer_body(images(1)) | {"parameters": {"priority": 1}}
    assert (await client.post("/v2/models/digits/infer", json=bad)).status_code == 400
    assert (
        await client.post("/predict", json={"inputs": images(1)[0].tolist()})
    ).status_code == 200
    (stats,) = (await client.get("/v2/models/digits/stats")).json()["model_stats"]
    assert stats["name"] == "digits" and stats["version"] == "1"
    assert stats["inference_count"] == 7
    inference = stats["inference_stats"]
    assert inference["success"]["count"] == 4 and inference["fail"]["count"] == 1
    # Requests, as Triton counts them (the instances are inference_count's): four ran.
    assert inference["queue"]["count"] == 4 and inference["compute_infer"]["count"] == 4
    assert inference["compute_input"]["count"] == inference["compute_output"]["count"] == 4
    # Each request's compute time is its batch's, once: never more than the request took.
    assert 0 < inference["compute_infer"]["ns"] <= inference["success"]["ns"]
    assert (
        sum(b["compute_infer"]["count"] for b in stats["batch_stats"]) == stats["execution_count"]
    )
    metrics = (await client.get("/metrics")).text
    assert (
        f'gpuserve_batch_size_sum{{model="digits",version="1"}} {float(stats["inference_count"])}'
        in metrics
    )
    assert (
        f'gpuserve_batch_size_count{{model="digits",version="1"}} {float(stats["execution_count"])}'
        in metrics
    )
    every = (await client.get("/v2/models/stats")).json()["model_stats"]
    assert [s["name"] for s in every] == ["digits"]
    assert (await client.get("/v2/models/digits/versions/1/stats")).status_code == 200
    assert (await client.get("/v2/models/nope/stats")).status_code == 404


async def test_class_count_gives_the_top_classes_as_triton_s_strings(
    client: httpx.AsyncClient, demo_model: Path
) -> None:
    batch = images(4)
    logits = torch.export.load(str(demo_model)).module()(torch.from_numpy(batch)).detach().numpy()
    wanted = [{"name": "logits", "parameters": {"class_count": 3}}]
    body = infer_body(batch) | {"outputs": wanted}
    (output,) = (await client.post("/v2/models/digits/infer", json=body)).json()["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [4, 3]
    rows = np.array(output["data"]).reshape(4, 3)
    for strings, scores in zip(rows, logits, strict=True):
        order = np.argsort(-scores, kind="stable")[:3]
        assert [int(s.split(":")[1]) for s in strings] == order.tolist()
        for text, index in zip(strings, order, strict=True):
            score, _, label = text.split(":")
            assert float(score) == pytest.approx(float(scores[index]), abs=1e-6)
            assert label == str(index)  # the digits' labels are "0" to "9"
    # The same strings in the binary extension's layout: a 4-byte length before each.
    wanted[0]["parameters"]["binary_data"] = True
    binary = await client.post(
        "/v2/models/digits/infer", json=infer_body(batch) | {"outputs": wanted}
    )
    length = int(binary.headers["inference-header-content-length"])
    raw, found = binary.content[length:], []
    while raw:
        size = int.from_bytes(raw[:4], "little")
        found.append(raw[4 : 4 + size].decode())
        raw = raw[4 + size :]
    assert found == rows.ravel().tolist()
    # More classes than the model has: all of them.
    wanted = [{"name": "logits", "parameters": {"class_count": 50}}]
    every = await client.post(
        "/v2/models/digits/infer", json=infer_body(batch) | {"outputs": wanted}
    )
    assert every.json()["outputs"][0]["shape"] == [4, 10]
    for bad in (0, -1, "3", 2.5, True):
        wanted = [{"name": "logits", "parameters": {"class_count": bad}}]
        refused = await client.post(
            "/v2/models/digits/infer", json=infer_body(batch) | {"outputs": wanted}
        )
        assert refused.status_code == 400 and "class_count" in refused.json()["error"]


def test_the_triton_client_reaches_each_version(demo_model: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        torch.nn.Linear(64, 10).eval(), (torch.randn(2, 64),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(tmp_path / "digits_v2.pt2"))
    spec = (
        '{ input = { name = "pixels", shape = [64] }, output = { name = "logits", shape = [10] } }'
    )
    config = tmp_path / "versions.toml"
    config.write_text(
        f'[[models]]\nname = "digits"\npath = "{demo_model}"\n'
        f'[[models]]\nname = "digits"\nversion = 2\npath = "digits_v2.pt2"\nspec = {spec}\n'
    )
    with ServerProcess("--config", str(config), "--device", "cpu") as server:
        wait_ready(server.url)
        client = triton.InferenceServerClient(url=urlsplit(server.url).netloc)
        try:
            assert client.get_model_metadata("digits")["versions"] == ["1", "2"]
            assert client.is_model_ready("digits", "1") and client.is_model_ready("digits", "2")
            tensor = triton.InferInput("pixels", [2, 64], "FP32")
            tensor.set_data_from_numpy(images(2), binary_data=True)
            answers = {}
            for asked in ("1", "2", ""):
                result = client.infer("digits", [tensor], model_version=asked)
                answers[asked] = result.as_numpy("logits")
                assert result.get_response()["model_version"] == (asked or "2")
            np.testing.assert_allclose(answers["2"], answers[""])
            assert not np.allclose(answers["1"], answers["2"])
            stats = client.get_inference_statistics("digits")["model_stats"]
            assert [(s["version"], s["inference_count"]) for s in stats] == [("1", 2), ("2", 4)]
            with pytest.raises(triton.InferenceServerException, match="no version '3'"):
                client.infer("digits", [tensor], model_version="3")
        finally:
            client.close()
        assert server.stop() == 0


@pytest.mark.parametrize(
    ("method", "path", "extension"),
    [
        ("POST", "/v2/systemsharedmemory/region/r/register", "system shared memory"),
        ("GET", "/v2/cudasharedmemory/status", "CUDA shared memory"),
        ("POST", "/v2/logging", "logging"),
        ("GET", "/v2/models/digits/versions/1/trace/setting", "trace"),
        ("POST", "/v2/models/digits/generate_stream", "generate"),
    ],
)
async def test_an_extension_not_served_is_a_501_that_names_it(
    client: httpx.AsyncClient, method: str, path: str, extension: str
) -> None:
    response = await client.request(method, path)
    assert response.status_code == 501
    body = response.json()
    assert body["error"] == f"the {extension} extension is not served by gpuserve"
    assert body["request_id"] == response.headers["x-request-id"]


async def test_a_route_that_does_not_exist_is_a_404_that_names_it(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/v2/models/digits/infer2")
    assert response.status_code == 404
    assert response.json()["error"] == (
        "no route POST /v2/models/digits/infer2 (the routes are listed at /docs)"
    )
    wrong = await client.delete("/v2/models/digits/infer")
    assert wrong.status_code == 405
    assert wrong.json()["error"] == "DELETE is not allowed on /v2/models/digits/infer"


@pytest.mark.parametrize(
    ("accept", "compressed"),
    [
        ("gzip", True),
        ("deflate, gzip;q=0.5", True),
        ("*", True),
        ("gzip;q=0", False),
        ("identity", False),
        ("br", False),
    ],
)
async def test_a_large_answer_is_gzipped_for_a_client_that_accepts_it(
    client: httpx.AsyncClient, accept: str, compressed: bool
) -> None:
    body = infer_body(images(12))
    response = await client.post(
        "/v2/models/digits/infer", json=body, headers={"accept-encoding": accept}
    )
    assert response.status_code == 200
    assert (response.headers.get("content-encoding") == "gzip") is compressed
    plain = await client.post(
        "/v2/models/digits/infer", json=body, headers={"accept-encoding": "identity"}
    )
    # httpx inflates a gzipped body: the same outputs either way.
    assert response.json()["outputs"] == plain.json()["outputs"]
    sent = int(response.headers["content-length"])
    assert sent < 0.8 * len(plain.content) if compressed else sent == len(plain.content)


async def test_a_small_answer_is_not_worth_compressing(client: httpx.AsyncClient) -> None:
    response = await client.get("/v2/health/live", headers={"accept-encoding": "gzip"})
    assert response.status_code == 200 and "content-encoding" not in response.headers
