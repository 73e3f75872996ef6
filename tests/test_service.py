"""ModelService without HTTP: background load, readiness states, shutdown at any moment."""

from __future__ import annotations

import gc
import threading

import anyio
import numpy as np
import pytest

from gpuserve.config import ModelSettings
from gpuserve.device import DeviceInfo
from gpuserve.errors import DeviceError, NotReady
from gpuserve.metrics import Metrics
from gpuserve.service import ModelService

from .conftest import CPU, FakeModel, fake_loader

pytestmark = pytest.mark.anyio


def cpu_prober(request: str) -> DeviceInfo:
    return CPU


def make(
    loader: object, prober: object = cpu_prober, settings: ModelSettings | None = None
) -> ModelService:
    settings = settings or ModelSettings(freeze_gc=False)
    return ModelService(settings, "cpu", loader, Metrics(), prober)  # type: ignore[arg-type]


async def until_settled(service: ModelService) -> None:
    with anyio.fail_after(10):
        while service.state == "loading":
            await anyio.sleep(0.005)


async def test_start_returns_before_the_load_finishes(fake_model: FakeModel) -> None:
    release = threading.Event()

    def slow(settings: ModelSettings, device: DeviceInfo) -> FakeModel:
        release.wait(timeout=30)
        return fake_model

    service = make(slow)
    await service.start()
    assert service.state == "loading"
    with pytest.raises(NotReady, match="still loading"):
        await service.predict([np.zeros(4, np.float32)], 10)
    release.set()
    await until_settled(service)
    assert service.state == "ready" and service.device == CPU
    assert await service.predict([np.ones(4, np.float32)], 10) == [4.0]
    await service.stop()
    assert service.state == "stopping"
    with pytest.raises(NotReady, match="shutting down"):
        await service.predict([np.ones(4, np.float32)], 10)


async def test_stop_while_loading_does_not_wait_for_the_load(fake_model: FakeModel) -> None:
    release = threading.Event()

    def stuck(settings: ModelSettings, device: DeviceInfo) -> FakeModel:
        release.wait(timeout=30)
        return fake_model

    service = make(stuck)
    await service.start()
    with anyio.fail_after(5):
        await service.stop()
    release.set()
    assert service.batcher is None and service.state == "stopping"


async def test_a_device_error_fails_the_load_with_its_reason(fake_model: FakeModel) -> None:
    def no_gpu(request: str) -> DeviceInfo:
        raise DeviceError("device 'cuda' was requested but no GPU is visible")

    service = make(fake_loader(fake_model), no_gpu)
    await service.start()
    await until_settled(service)
    assert service.readiness() == {
        "status": "failed",
        "reason": "model failed to load: device 'cuda' was requested but no GPU is visible",
    }
    await service.stop()


async def test_readiness_metric_follows_the_state(fake_model: FakeModel) -> None:
    metrics = Metrics()
    settings = ModelSettings(freeze_gc=False)
    service = ModelService(settings, "cpu", fake_loader(fake_model), metrics, cpu_prober)
    await service.start()
    await until_settled(service)
    assert b'gpuserve_ready{model="digits"} 1.0' in metrics.render()
    await service.stop()
    assert b'gpuserve_ready{model="digits"} 0.0' in metrics.render()


@pytest.mark.parametrize("freeze", [True, False])
async def test_gc_freeze_after_load_follows_the_setting(
    fake_model: FakeModel, freeze: bool
) -> None:
    gc.unfreeze()
    try:
        service = make(fake_loader(fake_model), settings=ModelSettings(freeze_gc=freeze))
        await service.start()
        await until_settled(service)
        assert (gc.get_freeze_count() > 0) is freeze
        await service.stop()
    finally:
        gc.unfreeze()


async def test_a_measured_batch_size_caps_the_batcher(fake_model: FakeModel) -> None:
    fake_model.preferred_batch_size = 2  # type: ignore[attr-defined]
    service = make(
        fake_loader(fake_model), settings=ModelSettings(max_batch_size=16, freeze_gc=False)
    )
    await service.start()
    await until_settled(service)
    assert service.max_batch_size == 2
    assert service.batcher is not None and service.batcher.max_batch_size == 2
    await service.stop()
