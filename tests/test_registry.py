"""Several models in one server: each loads, serves and fails on its own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import pytest

from gpuserve.app import create_app
from gpuserve.config import ModelSettings, Settings
from gpuserve.device import DeviceInfo
from gpuserve.errors import ModelLoadError, ModelNotFound
from gpuserve.metrics import Metrics
from gpuserve.registry import ModelRegistry

from .conftest import FAKE_SPEC, FakeModel
from .test_app import serving, wait_for_status

pytestmark = pytest.mark.anyio


def settings(*names: str, default: str | None = None) -> Settings:
    models = [ModelSettings(name=name, path=Path(f"{name}.pt2"), freeze_gc=False) for name in names]
    return Settings(device="cpu", models=models, default_model=default)


def loader_of(models: dict[str, FakeModel]):  # type: ignore[no-untyped-def]
    def load(model: ModelSettings, device: DeviceInfo) -> FakeModel:
        if model.key not in models:
            raise ModelLoadError(f"no weights for {model.key}")
        return models[model.key]

    return load


async def test_one_model_failing_to_load_leaves_the_others_serving() -> None:
    double = FakeModel(FAKE_SPEC, scale=2.0)
    triple = FakeModel(FAKE_SPEC, scale=3.0)
    app = create_app(
        settings("double", "broken", "triple"),
        loader=loader_of({"double": double, "triple": triple}),
    )
    async with serving(app, wait_ready=False) as client:
        ready = await wait_for_status(client, "ready")
        assert ready["models"]["double"] == {"status": "ready"}
        assert ready["models"]["broken"]["status"] == "failed"
        assert "no weights for broken" in ready["models"]["broken"]["reason"]

        body = {"inputs": [1, 1, 1, 1]}
        default = await client.post("/predict", json=body)
        assert default.json()["outputs"] == 8.0  # the first model is the default
        assert (await client.post("/models/triple/predict", json=body)).json()["outputs"] == 12.0
        broken = await client.post("/models/broken/predict", json=body)
        assert broken.status_code == 503 and "no weights for broken" in broken.json()["error"]
        assert (await client.post("/models/none/predict", json=body)).status_code == 404

        listed = (await client.get("/models")).json()
        assert listed["default"] == "double"
        assert [m["name"] for m in listed["models"]] == ["double", "broken", "triple"]
        assert (await client.get("/models/triple")).json()["state"] == {"status": "ready"}
        metrics = (await client.get("/metrics")).text
        assert 'gpuserve_ready{model="broken"} 0.0' not in metrics  # never became ready
        assert 'gpuserve_batch_size_count{model="triple"} 1.0' in metrics
        assert 'gpuserve_batch_size_count{model="double"} 1.0' in metrics
        route = 'protocol="http",route="/models/{name}/predict"'
        assert f'gpuserve_requests_total{{code="200",model="triple",{route}}} 1.0' in metrics
        assert f'gpuserve_requests_total{{code="503",model="broken",{route}}} 1.0' in metrics
        assert (double.batches, triple.batches) == ([1], [1])


async def test_the_default_model_can_be_named() -> None:
    models = {name: FakeModel(FAKE_SPEC, scale=s) for name, s in (("a", 1.0), ("b", 5.0))}
    app = create_app(settings("a", "b", default="b"), loader=loader_of(models))
    async with serving(app) as client:
        response = await client.post("/predict", json={"inputs": [1, 0, 0, 0]})
        assert response.json()["outputs"] == 5.0


async def test_the_server_is_not_ready_while_any_model_loads_nor_when_all_failed() -> None:
    registry = ModelRegistry(settings("x", "y"), loader_of({}), Metrics())
    assert registry.status == "loading"
    await registry.start()
    await settled(registry)
    assert registry.status == "failed"
    assert set(registry.readiness()["models"]) == {"x", "y"}
    with pytest.raises(ModelNotFound, match="this server has: x, y"):
        registry.get("z")
    await registry.stop()
    assert registry.status == "stopping"


async def test_a_model_may_be_pinned_to_its_own_device() -> None:
    asked: list[str] = []

    def prober(device: str) -> DeviceInfo:
        asked.append(device)
        return DeviceInfo(device="cpu", kind="cpu", name="cpu", reason="test")

    pinned = Settings(
        device="auto",
        models=[
            ModelSettings(name="a", path=Path("a.pt2")),
            ModelSettings(name="b", path=Path("b.pt2"), device="cuda:1"),
        ],
    )
    registry = ModelRegistry(pinned, loader_of({}), Metrics(), prober)
    await registry.start()
    await settled(registry)
    await registry.stop()
    assert sorted(asked) == ["auto", "cuda:1"]


async def settled(registry: ModelRegistry) -> None:
    with anyio.fail_after(10):
        while registry.status == "loading":
            await asyncio.sleep(0.01)
