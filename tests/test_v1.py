"""KServe's v1 protocol: the same answers as /predict, through the same checks and batcher."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sklearn.datasets import load_digits

from gpuserve.config import ModelSettings, Settings
from gpuserve.http import create_app
from gpuserve.model.device import DeviceInfo

from .helpers import DEMO, SETTINGS, FakeModel, serving

pytestmark = pytest.mark.anyio


def rows(n: int) -> list[list[float]]:
    data: list[list[float]] = load_digits().data[:n].tolist()
    return data


@pytest.fixture
async def client(demo_model: Path) -> AsyncIterator[httpx.AsyncClient]:
    model = ModelSettings(path=demo_model, freeze_gc=False, max_instances_per_request=8)
    async with serving(create_app(Settings(device="cpu", model=model))) as client:
        yield client


async def test_models_are_listed_and_each_says_it_is_ready(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/models")).json() == {"models": ["digits"]}
    assert (await client.get("/v1/models/digits")).json() == {"name": "digits", "ready": True}
    missing = await client.get("/v1/models/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


@pytest.mark.parametrize("field", ["instances", "inputs"])
async def test_predictions_are_predicts_outputs(client: httpx.AsyncClient, field: str) -> None:
    batch = rows(3)
    expected = (await client.post("/predict", json={"instances": batch})).json()["outputs"]
    response = await client.post("/v1/models/digits:predict", json={field: batch})
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": expected}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"instances": rows(1), "inputs": rows(1)}, "exactly one of 'instances' or 'inputs'"),
        ({}, "exactly one of 'instances' or 'inputs'"),
        ({"instances": []}, "'instances' must be a non-empty list"),
        ({"instances": rows(9)}, "instances: 9 given, at most 8 allowed"),
        ({"instances": [rows(1)[0], [1, 2]]}, "instances[1]: expected float32[64], got shape [2]"),
        ({"inputs": rows(1)[0]}, "inputs"),  # one instance, not a list of them
        ({"instances": rows(1), "extra": 1}, "extra"),
    ],
)
async def test_a_bad_body_is_a_422_that_names_the_problem(
    client: httpx.AsyncClient, body: dict[str, Any], message: str
) -> None:
    response = await client.post("/v1/models/digits:predict", json=body)
    assert response.status_code == 422
    assert message in response.json()["error"]
    assert (await client.post("/predict", json={"inputs": rows(1)[0]})).status_code == 200


async def test_the_root_is_kserve_v1_liveness_and_needs_no_key(fake_model: FakeModel) -> None:
    from .helpers import fake_loader

    settings = Settings(device="cpu", model={"path": DEMO}, api_keys=["a-key-of-sixteen-chars"])
    async with serving(create_app(settings, loader=fake_loader(fake_model))) as client:
        response = await client.get("/")
        assert response.status_code == 200 and response.json() == {"status": "alive"}
        assert (await client.get("/v1/models")).status_code == 401


async def test_a_loading_model_is_not_ready(fake_model: FakeModel) -> None:
    release = threading.Event()

    def slow(settings: ModelSettings, device: DeviceInfo) -> FakeModel:
        assert release.wait(timeout=30)
        return fake_model

    async with serving(create_app(SETTINGS, loader=slow), wait_ready=False) as client:
        loading = await client.get("/v1/models/digits")
        assert loading.status_code == 503 and "loading" in loading.json()["error"]
        refused = await client.post("/v1/models/digits:predict", json={"instances": [[1] * 4]})
        assert refused.status_code == 503
        release.set()
        with anyio.fail_after(30):
            while (await client.get("/v1/models/digits")).status_code != 200:
                await anyio.sleep(0.02)
        answer = await client.post("/v1/models/digits:predict", json={"instances": [[1] * 4]})
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1


# KServe's own REST clients (v1 and v2) against the app, and KServe's pydantic types reading
# the answers. KServe's package registers the protocol's gRPC messages under the names
# tritonclient's do, and protobuf refuses both in one process (see test_v2_grpc), so this
# runs in a process of its own, with the app in-process there (httpx's ASGI transport).
KSERVE_REST = """
import asyncio, json, sys
from pathlib import Path

import httpx, numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.rest.v2_datamodels import InferenceResponse

from gpuserve.http import create_app
from gpuserve.config import ModelSettings, Settings

async def main(model_path, rows):
    app = create_app(Settings(device="cpu", model=ModelSettings(path=Path(model_path))))
    out = {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gpuserve") as plain:
            while (await plain.get("/health/ready")).status_code != 200:
                await asyncio.sleep(0.05)
            # KServe's v2 data model reads the raw answers, with and without a request id.
            for body in ({"id": "r1"}, {}):
                tensor = {"name": "pixels", "shape": [2, 64], "datatype": "FP32"}
                body["inputs"] = [{**tensor, "data": np.ravel(rows[:2]).tolist()}]
                raw = (await plain.post("/v2/models/digits/infer", json=body)).json()
                out.setdefault("validated_ids", []).append(InferenceResponse(**raw).id)
        for protocol in ("v1", "v2"):
            client = InferenceRESTClient(RESTConfig(transport=transport, protocol=protocol))
            out[protocol + "_live"] = await client.is_server_live("http://gpuserve")
            out[protocol + "_ready"] = await client.is_model_ready("http://gpuserve", "digits")
            if protocol == "v1":
                answer = await client.infer("http://gpuserve", {"instances": rows}, "digits")
                out["v1"] = answer["predictions"]
            else:
                batch = np.array(rows, dtype=np.float32)
                for binary in (False, True):
                    tensor = InferInput("pixels", list(batch.shape), "FP32")
                    tensor.set_data_from_numpy(batch, binary_data=binary)
                    request = InferRequest("digits", [tensor], request_id="k2")
                    answer = await client.infer("http://gpuserve", request, "digits")
                    output = answer.outputs[0]
                    out["v2_" + str(binary)] = [answer.id, output.name, output.as_numpy().tolist()]
            await client.close()
    print("RESULT " + json.dumps(out))

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


def test_kserve_rest_clients_v1_and_v2(demo_model: Path) -> None:
    import json
    import subprocess
    import sys

    import numpy as np

    from gpuserve.handler import softmax

    data = rows(3)
    result = subprocess.run(
        [sys.executable, "-c", KSERVE_REST, str(demo_model), json.dumps(data)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    assert out["validated_ids"][0] == "r1" and out["validated_ids"][1]  # generated when absent
    for protocol in ("v1", "v2"):
        assert out[f"{protocol}_live"] and out[f"{protocol}_ready"]
    logits = np.array(out["v2_False"][2])
    assert out["v2_False"][:2] == ["k2", "logits"] and logits.shape == (3, 10)
    np.testing.assert_allclose(out["v2_True"][2], logits, atol=1e-6)
    probabilities = [p["probabilities"] for p in out["v1"]]
    np.testing.assert_allclose(probabilities, softmax(logits), atol=1e-6)
