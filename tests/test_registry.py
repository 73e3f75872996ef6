"""Several models in one server: each loads, serves and fails on its own."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import anyio
import numpy as np
import pytest

from gpuserve.config import ModelSettings, Settings
from gpuserve.core.errors import Conflict, ModelLoadError, ModelNotFound, NotReady
from gpuserve.core.metrics import Metrics
from gpuserve.core.registry import ModelRegistry
from gpuserve.http import create_app
from gpuserve.model.device import DeviceInfo
from gpuserve.spec import ModelSpec, TensorSpec

from .helpers import FAKE_SPEC, FakeModel, serving, wait_for_status

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
        assert 'gpuserve_ready{model="broken",version="1"} 0.0' not in metrics  # never became ready
        assert 'gpuserve_batch_size_count{model="triple",version="1"} 1.0' in metrics
        assert 'gpuserve_batch_size_count{model="double",version="1"} 1.0' in metrics
        route = 'protocol="http",route="/models/{name}/predict",version="1"'
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


# Several versions of one model.


def versioned(*versions: int, **extra: object) -> Settings:
    models = [
        ModelSettings(name="m", version=v, path=Path(f"m{v}.pt2"), freeze_gc=False)
        for v in versions
    ]
    return Settings(device="cpu", models=models, **extra)  # type: ignore[arg-type]


def version_loader(  # type: ignore[no-untyped-def]
    scales: dict[int, float], specs: dict[int, ModelSpec] | None = None
):
    def load(model: ModelSettings, device: DeviceInfo) -> FakeModel:
        if model.version not in scales:
            raise ModelLoadError(f"no weights for version {model.version}")
        spec = (specs or {}).get(model.version, FAKE_SPEC)
        return FakeModel(spec, scale=scales[model.version])

    return load


ONES = [np.ones(4, dtype=np.float32)]


async def test_routes_without_a_version_reach_the_highest_ready_or_the_configured_default() -> None:
    registry = ModelRegistry(versioned(1, 2, 3), version_loader({1: 1.0, 2: 2.0}), Metrics())
    await registry.start()
    await settled(registry)
    try:
        assert registry.versions("m") == ["1", "2", "3"]
        assert registry.get("m").version == "2"  # 3 failed to load: the highest ready serves
        assert registry.get("m", "1").version == "1"
        with pytest.raises(ModelNotFound, match="no version '7'; loaded: 1, 2, 3"):
            registry.get("m", "7")
        with pytest.raises(ModelNotFound, match="no version 'x'"):
            registry.get("m", "x")
        ready = registry.readiness()
        assert ready["models"]["m"]["status"] == "ready"
        versions = ready["models"]["m"]["versions"]
        assert [versions[v]["status"] for v in ("1", "2", "3")] == ["ready", "ready", "failed"]
    finally:
        await registry.stop()

    pinned = ModelRegistry(
        versioned(1, 2, default_versions={"m": 1}), version_loader({1: 1.0, 2: 2.0}), Metrics()
    )
    await pinned.start()
    await settled(pinned)
    try:
        assert pinned.get("m").version == "1"
        assert pinned.default.version == "1"
        await pinned.unload("m", 1.0, "1")  # the default version gone: the highest serves
        assert pinned.get("m").version == "2"
        with pytest.raises(NotReady, match="version 1 is unloaded"):
            pinned.get("m", "1")
    finally:
        await pinned.stop()


async def test_a_request_whose_model_was_retired_before_it_queued_goes_to_the_route_now() -> None:
    registry = ModelRegistry(versioned(1, 2), version_loader({1: 1.0, 2: 2.0}), Metrics())
    await registry.start()
    await settled(registry)
    try:
        first = registry.get("m", "1")
        spec = first.spec
        await registry.unload("m", 1.0, "1")
        # Found before the unload, unversioned: the version serving the route answers.
        now = registry.current(first, None, spec)
        assert (now.version, await now.predict(ONES, 1.0)) == ("2", [8.0])
        # Asked for version 1 itself: that version is gone, and the request is told so.
        assert registry.current(first, "1", spec) is first
        with pytest.raises(NotReady):
            await first.predict(ONES, 1.0)
        # A reload: the new copy of the same version answers.
        second = registry.get("m", "2")
        await registry.load(second.settings, 1.0)
        assert registry.current(second, "2", spec) is registry.get("m", "2") is not second
        # One still registered is its own answer.
        assert registry.current(registry.get("m"), None, spec) is registry.get("m")
    finally:
        await registry.stop()


async def test_a_retired_model_is_not_replaced_by_one_taking_other_tensors() -> None:
    wider = ModelSpec(
        name="fake",
        input=TensorSpec(name="x", shape=(5,), dtype="float32"),
        output=TensorSpec(name="y", shape=(1,), dtype="float32"),
    )
    loader = version_loader({1: 1.0, 2: 2.0}, {2: wider})  # version 2 takes 5 values
    registry = ModelRegistry(versioned(1), loader, Metrics())
    await registry.start()
    await settled(registry)
    try:
        first = registry.get("m")
        spec = first.spec
        await registry.load(versioned(2).served_models[0], 1.0)
        await registry.unload("m", 1.0, "1")
        assert registry.current(first, None, spec) is first  # whose predict says why
        with pytest.raises(NotReady):
            await first.predict(ONES, 1.0)
        assert registry.get("m").version == "2"
    finally:
        await registry.stop()


async def test_an_unload_that_conflicts_claims_no_version() -> None:
    gate = threading.Event()
    loads: list[int] = []

    def load(model: ModelSettings, device: DeviceInfo) -> FakeModel:
        loads.append(model.version)
        if loads.count(1) > 1:  # the reload of version 1 waits for the test
            gate.wait(10)
        return FakeModel(FAKE_SPEC, scale=float(model.version))

    # Version 2 first: an unload of both would claim it before it met version 1's reload.
    registry = ModelRegistry(versioned(2, 1), load, Metrics())
    await registry.start()
    await settled(registry)
    try:
        reload = asyncio.ensure_future(registry.load(registry.get("m", "1").settings, 1.0))
        while loads.count(1) < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(Conflict, match="version 1 is being loaded or unloaded"):
            await registry.unload("m", 1.0)  # every version: version 1 is reloading
        await registry.unload("m", 1.0, "2")  # version 2 was not left claimed
        assert registry.versions("m") == ["1"]
        gate.set()
        await reload
    finally:
        gate.set()
        await registry.stop()
