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

from gpuserve.app import create_app
from gpuserve.config import ModelSettings, Settings
from gpuserve.device import DeviceInfo

from .conftest import FakeModel
from .test_app import SETTINGS, serving

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
