"""ModelService without HTTP: background load, readiness states, shutdown at any moment."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading

import anyio
import numpy as np
import pytest

from gpuserve.config import ModelSettings
from gpuserve.core.errors import (
    DeadlineExceeded,
    DeviceError,
    InferenceError,
    InvalidInput,
    ModelLoadError,
    NotReady,
)
from gpuserve.core.metrics import Metrics
from gpuserve.core.service import ModelService
from gpuserve.model.device import DeviceInfo

from .helpers import CPU, DEMO, FAKE_SPEC, FakeModel, fake_loader

pytestmark = pytest.mark.anyio


def cpu_prober(request: str) -> DeviceInfo:
    return CPU


def make(
    loader: object, prober: object = cpu_prober, settings: ModelSettings | None = None
) -> ModelService:
    settings = settings or ModelSettings(path=DEMO, freeze_gc=False)
    return ModelService(settings, "cpu", loader, Metrics(), prober)  # type: ignore[arg-type]


async def until_settled(service: ModelService) -> None:
    with anyio.fail_after(10):
        while service.state == "loading":
            await anyio.sleep(0.005)


async def started(service: ModelService) -> ModelService:
    await service.start()
    await until_settled(service)
    return service


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
    settings = ModelSettings(path=DEMO, freeze_gc=False)
    service = ModelService(settings, "cpu", fake_loader(fake_model), metrics, cpu_prober)
    await service.start()
    await until_settled(service)
    assert b'gpuserve_ready{model="digits",version="1"} 1.0' in metrics.render()
    await service.stop()
    assert b'gpuserve_ready{model="digits",version="1"} 0.0' in metrics.render()


@pytest.mark.parametrize("freeze", [True, False])
async def test_gc_freeze_after_load_follows_the_setting(
    fake_model: FakeModel, freeze: bool
) -> None:
    gc.unfreeze()
    try:
        service = make(fake_loader(fake_model), settings=ModelSettings(path=DEMO, freeze_gc=freeze))
        await service.start()
        await until_settled(service)
        assert (gc.get_freeze_count() > 0) is freeze
        await service.stop()
    finally:
        gc.unfreeze()


async def test_a_measured_batch_size_caps_the_batcher(fake_model: FakeModel) -> None:
    fake_model.preferred_batch_size = 2  # type: ignore[attr-defined]
    service = make(
        fake_loader(fake_model),
        settings=ModelSettings(path=DEMO, max_batch_size=16, freeze_gc=False),
    )
    await service.start()
    await until_settled(service)
    assert service.max_batch_size == 2
    assert service.batcher is not None and service.batcher.max_batch_size == 2
    await service.stop()


@pytest.mark.parametrize("hold", [True, False])
async def test_the_batcher_gets_the_hold_for_callers_setting(
    fake_model: FakeModel, hold: bool
) -> None:
    settings = ModelSettings(path=DEMO, hold_for_callers=hold, max_wait_ms=7.0, freeze_gc=False)
    service = make(fake_loader(fake_model), settings=settings)
    await service.start()
    await until_settled(service)
    assert service.batcher is not None
    assert service.batcher.hold_for_callers is hold
    assert service.batcher.max_wait_s == pytest.approx(0.007)
    await service.stop()


@pytest.mark.parametrize(("cores", "overlap"), [(1, False), (1 << 20, True)])
async def test_a_cpu_model_overlaps_batches_only_when_cores_are_left_beside_its_threads(
    fake_model: FakeModel, monkeypatch: pytest.MonkeyPatch, cores: int, overlap: bool
) -> None:
    monkeypatch.setattr("gpuserve.core.service.available_cores", lambda: cores)
    service = await started(make(fake_loader(fake_model)))
    assert service.batcher is not None and service.batcher.overlap is overlap
    await service.stop()


def gpus(count: int):  # type: ignore[no-untyped-def]
    """A prober for a box with `count` GPUs: `auto`/`all` pick cuda:0, cuda:N is itself."""
    asked: list[str] = []

    def prober(request: str) -> DeviceInfo:
        asked.append(request)
        index = 0 if request in ("auto", "all") else int(request.split(":")[1])
        return DeviceInfo(
            device=f"cuda:{index}", kind="cuda", name="g", reason="test", visible_devices=count
        )

    return prober, asked


@pytest.mark.parametrize(("device", "count", "copies"), [("all", 3, 6), ("cuda:1", 3, 2)])
async def test_copies_per_device_and_on_every_gpu(device: str, count: int, copies: int) -> None:
    placed: list[str] = []

    def loader(settings: ModelSettings, on: DeviceInfo) -> FakeModel:
        placed.append(on.device)
        return FakeModel(FAKE_SPEC)

    prober, _ = gpus(count)
    settings = ModelSettings(path=DEMO, freeze_gc=False, device=device, instances_per_device=2)
    service = make(loader, prober, settings)
    await service.start()
    await until_settled(service)
    assert service.state == "ready"
    assert service.batcher is not None and service.batcher.workers == copies
    expected = [f"cuda:{i}" for i in range(count)] if device == "all" else [device]
    assert placed == [d for d in expected for _ in range(2)]
    assert [d.device for d in service.devices] == expected
    results = await service.predict([np.ones(4, np.float32)] * 5, 10)
    assert results == [4.0] * 5
    await service.stop()


async def test_a_gpu_model_overlaps_batches_even_on_one_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("gpuserve.core.service.available_cores", lambda: 1)
    prober, _ = gpus(1)
    settings = ModelSettings(path=DEMO, freeze_gc=False, device="cuda:0")
    service = make(fake_loader(FakeModel(FAKE_SPEC)), prober, settings)
    await service.start()
    await until_settled(service)
    assert service.batcher is not None and service.batcher.overlap is True
    await service.stop()


async def test_all_on_a_cpu_box_is_one_cpu_copy_per_instance() -> None:
    placed: list[str] = []

    def loader(settings: ModelSettings, on: DeviceInfo) -> FakeModel:
        placed.append(on.device)
        return FakeModel(FAKE_SPEC)

    service = make(loader, settings=ModelSettings(path=DEMO, freeze_gc=False, device="all"))
    await service.start()
    await until_settled(service)
    assert placed == ["cpu"]
    await service.stop()


class Picky(FakeModel):
    """A model with a preprocess hook that refuses some inputs and breaks on others."""

    def preprocess(self, instance: np.ndarray) -> np.ndarray:
        if instance[0] < 0:
            raise InvalidInput("the first value must not be negative")
        if instance[0] > 50:
            raise ZeroDivisionError("a bug in the user's hook")
        return instance * 2


async def test_preprocess_errors_are_the_clients_or_a_500_never_a_crash() -> None:
    service = make(fake_loader(Picky(FAKE_SPEC)))
    await service.start()
    await until_settled(service)
    assert await service.predict([np.ones(4, np.float32)], 10) == [8.0]
    with pytest.raises(InvalidInput, match="must not be negative"):
        await service.predict([-np.ones(4, np.float32)], 10)
    with pytest.raises(InferenceError, match="preprocessing failed") as failed:
        await service.predict([np.full(4, 99, np.float32)], 10)
    assert isinstance(failed.value.__cause__, ZeroDivisionError)
    await service.stop()


class ThreadRecorder(FakeModel):
    """Records the thread it is warmed in and the threads it serves from."""

    def __init__(self) -> None:
        super().__init__(FAKE_SPEC)
        self.warmed_in: str | None = None
        self.served_in: set[str] = set()
        self.preferred_batch_size: int | None = None

    def warm(self) -> None:
        self.warmed_in = threading.current_thread().name
        self.preferred_batch_size = 2

    def __call__(self, instances: list[np.ndarray]) -> list[float]:
        self.served_in.add(threading.current_thread().name)
        return super().__call__(instances)


async def test_each_copy_is_warmed_in_the_thread_that_serves_it() -> None:
    copies: list[ThreadRecorder] = []

    def loader(settings: ModelSettings, device: DeviceInfo) -> ThreadRecorder:
        copies.append(ThreadRecorder())
        return copies[-1]

    service = make(
        loader, settings=ModelSettings(path=DEMO, freeze_gc=False, instances_per_device=2)
    )
    await service.start()
    await until_settled(service)
    assert service.state == "ready"
    x = np.ones(4, np.float32)
    for _ in range(20):
        await service.predict([x, x, x], timeout_s=10)
    for copy in copies:
        assert copy.warmed_in is not None and "-fwd" in copy.warmed_in
        assert copy.served_in <= {copy.warmed_in}  # served only from where it was warmed
    assert any(copy.served_in for copy in copies)
    assert service.batcher is not None and service.batcher.max_batch_size == 2  # tuned there
    await service.stop()


async def test_a_failed_warm_up_fails_the_load_with_its_reason() -> None:
    class Broken(FakeModel):
        def warm(self) -> None:
            raise InvalidInput("warm-up batch failed: the spec does not match")

    service = make(fake_loader(Broken(FAKE_SPEC)))
    await service.start()
    await until_settled(service)
    assert service.state == "failed" and "spec does not match" in (service.reason or "")
    await service.stop()


@pytest.mark.parametrize(
    ("raised", "traceback_logged"),
    [(ModelLoadError("model file not found: nope.pt2"), False), (KeyError("a bug"), True)],
)
async def test_a_users_load_error_is_one_line_and_a_bug_keeps_its_traceback(
    caplog: pytest.LogCaptureFixture, raised: Exception, traceback_logged: bool
) -> None:
    def loader(settings: ModelSettings, device: DeviceInfo) -> FakeModel:
        raise raised

    caplog.set_level(logging.INFO, logger="gpuserve.core.service")
    service = make(loader)
    await service.start()
    await until_settled(service)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(raised) in errors[0].getMessage()
    assert (errors[0].exc_info is not None) is traceback_logged
    await service.stop()


class Blocking(FakeModel):
    """Hooks that block their thread until told to go on: a stand-in for heavy hooks."""

    def __init__(self) -> None:
        super().__init__(FAKE_SPEC)
        self.go = threading.Event()
        self.threads: set[str] = set()

    def preprocess(self, instance: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        assert self.go.wait(timeout=10)
        return instance

    def postprocess(self, row: object) -> object:
        self.threads.add(threading.current_thread().name)
        return {"row": row}


async def test_offloaded_hooks_run_off_the_event_loop() -> None:
    """With offload_hooks, a hook that blocks its thread leaves the event loop running: the
    coroutine that lets it go on gets to run. (On the loop it would wait forever, so only the
    offloaded case is run here.)"""
    model = Blocking()
    service = make(
        fake_loader(model), settings=ModelSettings(path=DEMO, freeze_gc=False, offload_hooks=True)
    )
    await service.start()
    await until_settled(service)

    async def release_later() -> None:
        await anyio.sleep(0.05)
        model.go.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(release_later)
            (result,) = await service.predict([np.ones(4, np.float32)], timeout_s=10)
    assert result == {"row": 4.0}  # preprocessed, summed by the model, postprocessed
    assert threading.main_thread().name not in model.threads and model.threads
    await service.stop()


async def test_a_failed_warm_up_says_why_and_nothing_of_a_drain(
    fake_model: FakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing was accepted before the warm-up failed: there is nothing to drain."""

    def refuse() -> None:
        raise ModelLoadError("the model takes fewer arguments than a padded batch gives")

    fake_model.warm = refuse  # type: ignore[attr-defined]
    service = await started(make(fake_loader(fake_model)))
    assert service.state == "failed"
    assert "fewer arguments than a padded batch gives" in (service.reason or "")
    assert not [r for r in caplog.records if "drain took longer" in r.getMessage()]
    await service.stop()


async def test_a_call_admitted_before_the_stop_is_answered_while_it_drains(
    fake_model: FakeModel,
) -> None:
    service = await started(make(fake_loader(fake_model)))
    spec = service.admit()  # a call still receiving its body when the stop signal comes
    assert spec is fake_model.spec
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(service.stop)
        await anyio.sleep(0.05)
        assert service.state == "stopping"
        with pytest.raises(NotReady, match="shutting down"):
            service.admit()  # a new call is refused ...
        # ... the admitted one still reaches the batcher, and the stop waits for it.
        assert await service.predict([np.ones(4, np.float32)], 10) == [4.0]
        assert service.batcher is not None and service.batcher.running
        service.leave()
    assert not service.batcher.running


async def test_a_call_that_never_leaves_cannot_hold_the_stop_past_its_timeout(
    fake_model: FakeModel,
) -> None:
    service = await started(make(fake_loader(fake_model)))
    service.admit()
    with anyio.fail_after(5):
        await service.stop(timeout_s=0.2)
    assert service.batcher is not None and not service.batcher.running


async def test_submit_answers_as_predict_does_without_a_task_per_call(
    fake_model: FakeModel,
) -> None:
    service = await started(make(fake_loader(fake_model)))
    tasks_before = len(asyncio.all_tasks())
    rows = service.submit([np.ones(4, np.float32), np.full(4, 2, np.float32)], 10)
    assert len(asyncio.all_tasks()) == tasks_before
    assert await rows == await service.predict(
        [np.ones(4, np.float32), np.full(4, 2, np.float32)], 10
    )
    fake_model.error = RuntimeError("the model broke")
    with pytest.raises(InferenceError) as failed:
        await service.submit([np.ones(4, np.float32)], 10)
    assert isinstance(failed.value.__cause__, RuntimeError)
    fake_model.error = None
    await service.stop()


async def test_a_submitted_call_past_its_deadline_or_cancelled_leaves_the_queue(
    fake_model: FakeModel,
) -> None:
    settings = ModelSettings(path=DEMO, freeze_gc=False, max_batch_size=1)
    service = await started(make(fake_loader(fake_model), settings=settings))
    fake_model.delay_s = 0.3
    busy = service.submit([np.ones(4, np.float32)], 10)
    await anyio.sleep(0.05)  # the worker holds the first one
    late = service.submit([np.full(4, 2, np.float32)], 0.05)
    gone = service.submit([np.full(4, 3, np.float32)], 10)
    gone.cancel()
    with pytest.raises(DeadlineExceeded):
        await late
    assert service.batcher is not None and service.batcher.queue_depth == 0
    assert await busy == [4.0]
    assert fake_model.batches == [1]  # neither the late nor the cancelled one ran
    await service.stop()
