"""Priority levels, as Triton defines them, through every way in: the v2 `priority`
parameter (JSON; gRPC shares its decoding), X-Priority on /predict, the model's default
level, the model configuration, and clear 4xx for a level the model does not have."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest

from gpuserve.config import ModelSettings, Settings
from gpuserve.http import create_app

from .helpers import DEMO, FAKE_SPEC, FakeModel, fake_loader, serving

pytestmark = pytest.mark.anyio


class Recording(FakeModel):
    """Records each batch's instances by their first value; the first batch waits for
    `release`, so that what arrives meanwhile queues."""

    def __init__(self) -> None:
        super().__init__(FAKE_SPEC)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.seen: list[list[int]] = []

    def __call__(self, instances: list[np.ndarray[Any, Any]]) -> list[Any]:
        self.seen.append([int(x[0]) for x in instances])
        self.entered.set()
        self.release.wait(timeout=30)
        return super().__call__(instances)


def v2(value: int, **parameters: Any) -> dict[str, Any]:
    tensor = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [value, 0, 0, 0]}
    return {"inputs": [tensor], "parameters": parameters}


@pytest.fixture
def model() -> Recording:
    return Recording()


async def app_with(model: Recording, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    config = ModelSettings(path=DEMO, name="fake", freeze_gc=False, max_batch_size=4, **settings)
    app = create_app(Settings(device="cpu", model=config), loader=fake_loader(model))
    async with serving(app) as client:
        yield client


@pytest.fixture
async def leveled(model: Recording) -> AsyncIterator[httpx.AsyncClient]:
    async for client in app_with(model, priority_levels=3, default_priority_level=2):
        yield client


async def held(client: httpx.AsyncClient, model: Recording) -> asyncio.Task[httpx.Response]:
    """A first request in the worker, held there, so that the next ones queue."""
    first = asyncio.create_task(client.post("/v2/models/fake/infer", json=v2(99)))
    while not model.entered.is_set():
        await asyncio.sleep(0.005)
    return first


async def test_the_highest_level_goes_first_and_the_default_sits_between(
    leveled: httpx.AsyncClient, model: Recording
) -> None:
    first = await held(leveled, model)
    post = leveled.post
    low = [
        asyncio.create_task(post("/v2/models/fake/infer", json=v2(30 + i, priority=3)))
        for i in range(6)
    ]
    await asyncio.sleep(0.05)  # queued before the others
    plain = asyncio.create_task(post("/v2/models/fake/infer", json=v2(20)))  # default: 2
    header = asyncio.create_task(
        post("/predict", json={"inputs": [10, 0, 0, 0]}, headers={"x-priority": "1"})
    )
    await asyncio.sleep(0.05)
    model.release.set()
    answers = await asyncio.gather(first, *low, plain, header)
    assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
    # The batch after the held one: level 1 (/predict's header), level 2 (no priority: the
    # default), then the flood's oldest; the flood waited one batch longer, no more.
    assert model.seen[1] == [10, 20, 30, 31]
    assert model.seen[2] == [32, 33, 34, 35]


async def test_the_configuration_reports_the_levels(leveled: httpx.AsyncClient) -> None:
    batching = (await leveled.get("/v2/models/fake/config")).json()["dynamic_batching"]
    assert (batching["priority_levels"], batching["default_priority_level"]) == (3, 2)


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (v2(1, priority=4), {}, 400, "priority must be from 1 (the highest) to 3, not 4"),
        (v2(1, priority=True), {}, 400, "parameter 'priority' must be a whole number"),
        ({"inputs": [1, 0, 0, 0]}, {"x-priority": "high"}, 422, "X-Priority must be a whole"),
    ],
)
async def test_a_level_the_model_does_not_have_is_a_clear_4xx(
    leveled: httpx.AsyncClient,
    body: dict[str, Any],
    headers: dict[str, str],
    status: int,
    message: str,
) -> None:
    route = "/v2/models/fake/infer" if "parameters" in body else "/predict"
    response = await leveled.post(route, json=body, headers=headers)
    assert response.status_code == status and message in response.json()["error"]


async def test_a_model_without_levels_refuses_a_priority_and_takes_the_default(
    model: Recording,
) -> None:
    model.release.set()
    async for client in app_with(model):
        refused = await client.post("/v2/models/fake/infer", json=v2(1, priority=1))
        assert refused.status_code == 400
        assert "has no priority levels (set priority_levels)" in refused.json()["error"]
        assert (await client.post("/v2/models/fake/infer", json=v2(1, priority=0))).is_success
        config = (await client.get("/v2/models/fake/config")).json()["dynamic_batching"]
        assert "priority_levels" not in config


def test_a_default_level_outside_the_levels_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="default_priority_level must be a level from 1 to"):
        ModelSettings(path=DEMO, priority_levels=2, default_priority_level=3)
