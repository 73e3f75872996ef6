"""The engine and its fronts in one event loop: a front's model served by the engine's
batcher, requests of several fronts in one batch, errors, deadlines, hang-ups, and an
engine that goes away. Local ZeroMQ sockets, no network and no process."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gpuserve.config import ModelSettings, Settings
from gpuserve.core.batcher import Trace
from gpuserve.core.errors import (
    DeadlineExceeded,
    GpuserveError,
    InferenceError,
    NotReady,
    Overloaded,
)
from gpuserve.core.metrics import Metrics
from gpuserve.core.tracing import Tracing
from gpuserve.engine import wire
from gpuserve.engine.link import EngineLink
from gpuserve.engine.process import Engine
from gpuserve.engine.remote import RemoteService

from .helpers import DEMO, FAKE_SPEC, FakeModel, fake_loader

pytestmark = pytest.mark.anyio

MODEL = ModelSettings(path=DEMO, name="fake", freeze_gc=False, max_wait_ms=1)


def test_large_arrays_travel_as_frames_of_their_own_and_all_come_back_equal() -> None:
    large = np.arange(2**16, dtype=np.float32).reshape(256, 256)
    small = {"ids": np.arange(64, dtype=np.int64)}
    request = wire.Request(7, ("fake", "1"), [large, small, large[:2]], 1.5)
    frames = wire.pack(wire.INFER, [request])
    assert frames[0] == wire.INFER
    assert len(frames) == 3  # kind, payload, and the large array
    assert len(frames[1]) < 4096  # holding the small ones only
    kind, [back] = wire.unpack(frames)
    assert kind == wire.INFER and (back.id, back.model, back.deadline) == (7, ("fake", "1"), 1.5)
    np.testing.assert_array_equal(back.instances[0], large)
    np.testing.assert_array_equal(back.instances[1]["ids"], small["ids"])
    np.testing.assert_array_equal(back.instances[2], large[:2])


def test_errors_keep_their_class_and_message_and_others_say_only_that_inference_failed() -> None:
    crossed = wire.error_from(wire.error_of(Overloaded("the queue is full", retry_after_s=1)))
    assert type(crossed) is Overloaded
    assert (crossed.message, crossed.retry_after_s) == ("the queue is full", 1)
    hidden = wire.error_from(wire.error_of(ValueError("secret detail")))
    assert type(hidden) is InferenceError and "secret" not in hidden.message
    assert type(wire.error_from(("Exception", "x", None))) is InferenceError  # no other class


@dataclass
class Front:
    link: EngineLink
    service: RemoteService


@asynccontextmanager
async def engine_with_fronts(
    model: FakeModel, fronts: int = 1, settings: ModelSettings = MODEL
) -> AsyncIterator[tuple[Engine, list[Front]]]:
    folder = tempfile.mkdtemp(prefix="gs-")  # a socket's path is short
    address = f"ipc://{folder}/engine.sock"
    engine = Engine(Settings(device="cpu", model=settings), address, fake_loader(model), Metrics())
    stopped = asyncio.Event()
    running = asyncio.create_task(engine.run(stopped))
    made = []
    try:
        for index in range(fronts):
            link = EngineLink(address, f"front-{index}")
            await link.start()
            service = RemoteService(settings, link, Metrics())
            await service.start()
            made.append(Front(link, service))
        with anyio.fail_after(10):
            for front in made:
                await front.service.loaded()
        yield engine, made
    finally:
        for front in made:
            await front.service.stop(1)
            await front.link.close()
        stopped.set()
        await running
        shutil.rmtree(folder, ignore_errors=True)


def rows(*values: float) -> list[np.ndarray]:
    return [np.full(4, value, np.float32) for value in values]


async def test_a_front_serves_the_engines_model_with_its_spec_and_answers(
    fake_model: FakeModel,
) -> None:
    async with engine_with_fronts(fake_model) as (_, [front]):
        assert front.service.state == "ready"
        assert front.service.spec == fake_model.spec
        assert await front.service.predict(rows(1, 2), 10) == [4.0, 8.0]
        assert front.service.readiness() == {"status": "ready"}


async def test_requests_of_several_fronts_meet_in_one_batch(fake_model: FakeModel) -> None:
    async with engine_with_fronts(fake_model, fronts=3) as (_, fronts):
        fake_model.delay_s = 0.3  # the first batch holds the worker while the rest arrive
        first = asyncio.create_task(fronts[0].service.predict(rows(9), 10))
        with anyio.fail_after(5):
            while not fake_model.batches:
                await asyncio.sleep(0.005)
        calls = [
            front.service.predict(rows(index + 1), 10)
            for _ in range(4)
            for index, front in enumerate(fronts)
        ]
        answers = await asyncio.gather(*calls)
        assert await first == [36.0]
        assert answers == [[4.0 * (index + 1)] for _ in range(4) for index in range(3)]
        # Each front sent 4; a batch of more than 4 holds several fronts' requests.
        assert fake_model.batches[1:] and max(fake_model.batches[1:]) > 4, fake_model.batches


async def test_the_engines_errors_reach_the_caller_with_their_class(
    fake_model: FakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    async with engine_with_fronts(fake_model) as (_, [front]):
        fake_model.error = RuntimeError("the model broke")
        with pytest.raises(InferenceError) as failed:
            await front.service.predict(rows(1), 10, trace=Trace(request_id="abc123"))
        assert "broke" not in failed.value.message
        # The traceback is logged where it happened, with the client's request id.
        (logged,) = [r for r in caplog.records if "failed in the engine" in r.getMessage()]
        assert "abc123" in logged.getMessage() and logged.exc_info is not None
        fake_model.error = None
        assert await front.service.predict(rows(1), 10) == [4.0]


async def test_the_engines_queue_bound_is_the_models_one(fake_model: FakeModel) -> None:
    settings = MODEL.model_copy(update={"max_queue_size": 2, "max_batch_size": 1})
    async with engine_with_fronts(fake_model, fronts=2, settings=settings) as (_, fronts):
        fake_model.delay_s = 0.2
        calls = [front.service.predict(rows(1), 10) for front in fronts for _ in range(4)]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        refused = [a for a in answers if isinstance(a, Overloaded)]
        assert refused and all(a == [4.0] for a in answers if not isinstance(a, Exception))


async def test_a_deadline_passes_in_the_engine_and_the_caller_gets_504(
    fake_model: FakeModel,
) -> None:
    async with engine_with_fronts(fake_model) as (engine, [front]):
        fake_model.delay_s = 0.5
        busy = asyncio.create_task(front.service.predict(rows(1), 10))
        await asyncio.sleep(0.05)
        with anyio.fail_after(5), pytest.raises(DeadlineExceeded):
            await front.service.predict(rows(2), 0.1)
        # The engine's deadline, not only the front's own backstop (a second later).
        assert b'gpuserve_timed_out_total{model="fake",version="1"} 1.0' in engine.metrics.render()
        assert await busy == [4.0]


async def test_a_caller_that_goes_away_takes_its_request_out_of_the_engine(
    fake_model: FakeModel,
) -> None:
    async with engine_with_fronts(fake_model) as (engine, [front]):
        fake_model.delay_s = 0.3
        busy = asyncio.create_task(front.service.predict(rows(1), 10))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(front.service.predict(rows(2), 10))
        with anyio.fail_after(5):
            while len(engine._calls) < 2:
                await asyncio.sleep(0.005)
        gone.cancel()
        with anyio.fail_after(5):
            while len(engine._calls) > 1:  # the abort reached the engine
                await asyncio.sleep(0.005)
        assert await busy == [4.0]
        assert fake_model.batches == [1]  # the gone one never ran


async def test_an_engine_that_goes_away_fails_what_waits_at_once_and_reads_as_loading(
    fake_model: FakeModel,
) -> None:
    folder = tempfile.mkdtemp(prefix="gs-")
    address = f"ipc://{folder}/engine.sock"
    link = EngineLink(address, "front-0")
    await link.start()
    service = RemoteService(MODEL, link, Metrics())
    await service.start()
    try:
        assert service.state == "loading"
        with pytest.raises(NotReady):  # no engine yet
            await service.predict(rows(1), 10)
        for _ in range(2):  # the first engine, then its replacement on the same socket
            engine = Engine(
                Settings(device="cpu", model=MODEL), address, fake_loader(fake_model), Metrics()
            )
            stopped = asyncio.Event()
            running = asyncio.create_task(engine.run(stopped))
            with anyio.fail_after(10):
                await service.loaded()
            assert service.state == "ready"
            assert await service.predict(rows(1), 10) == [4.0]
            fake_model.delay_s = 1.0
            waiting = asyncio.create_task(service.predict(rows(1), 30))
            await asyncio.sleep(0.1)
            assert engine.router is not None
            engine.router.close(linger=0)  # the engine dies without answering
            with anyio.fail_after(0.9), pytest.raises(NotReady, match="engine"):
                await waiting
            fake_model.delay_s = 0.0
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            with anyio.fail_after(5):
                while service.state != "loading":
                    await asyncio.sleep(0.01)
    finally:
        await service.stop(1)
        await link.close()
        shutil.rmtree(folder, ignore_errors=True)


class DeviceBroken(RuntimeError):
    """Stands for a sticky CUDA error: the device is gone for this process."""


class Breakable(FakeModel):
    def is_fatal(self, exc: BaseException) -> bool:
        return isinstance(exc, DeviceBroken)


async def test_a_model_lost_to_a_fatal_device_error_ends_the_engine_to_be_replaced() -> None:
    model = Breakable(FAKE_SPEC)
    async with engine_with_fronts(model) as (engine, [front]):
        assert await front.service.predict(rows(1), 10) == [4.0]
        model.error = DeviceBroken("an illegal memory access was encountered")
        with pytest.raises(GpuserveError):
            await front.service.predict(rows(1), 10)
        with anyio.fail_after(5):
            while engine.lost is None:
                await asyncio.sleep(0.01)
        assert "illegal memory access" in engine.lost


class Ordered(FakeModel):
    """Records each batch by its instances' first values."""

    def __init__(self) -> None:
        super().__init__(FAKE_SPEC)
        self.seen: list[list[float]] = []

    def __call__(self, instances: list[np.ndarray]) -> list[Any]:
        self.seen.append([float(x[0]) for x in instances])
        return super().__call__(instances)


async def test_a_requests_priority_level_crosses_to_the_engines_queue() -> None:
    model = Ordered()
    settings = MODEL.model_copy(update={"priority_levels": 2, "max_batch_size": 2})
    async with engine_with_fronts(model, settings=settings) as (_, [front]):
        model.delay_s = 0.3
        first = asyncio.create_task(front.service.predict(rows(9), 10))
        with anyio.fail_after(5):
            while not model.seen:
                await asyncio.sleep(0.005)
        low = [front.service.predict(rows(5), 10, level=1) for _ in range(3)]
        low_calls = [asyncio.create_task(call) for call in low]
        await asyncio.sleep(0.05)
        urgent = await asyncio.gather(front.service.predict(rows(1), 10, level=0), *low_calls)
        assert urgent[0] == [4.0] and await first == [36.0]
        assert model.seen[1][0] == 1.0  # the urgent one in the next batch


async def test_a_front_that_goes_away_loses_its_answers_and_the_others_are_served(
    fake_model: FakeModel,
) -> None:
    async with engine_with_fronts(fake_model, fronts=2) as (engine, [gone, kept]):
        fake_model.delay_s = 0.2
        waiting = asyncio.create_task(gone.service.predict(rows(1), 10))
        with anyio.fail_after(5):
            while not engine._calls:
                await asyncio.sleep(0.005)
        await gone.link.close()  # the front's process died: its socket is gone
        with pytest.raises(NotReady):
            await waiting
        fake_model.delay_s = 0.0
        # The engine answers into the void for the gone one and serves the other.
        assert await kept.service.predict(rows(2), 10) == [8.0]
        with anyio.fail_after(5):
            while engine._calls:
                await asyncio.sleep(0.005)


async def test_a_fronts_trace_learns_when_its_batch_ran_and_links_the_engines_batch_span(
    fake_model: FakeModel,
) -> None:
    exporter = InMemorySpanExporter()
    async with engine_with_fronts(fake_model) as (engine, [front]):
        engine.metrics.traces = Tracing(exporter, immediate=True)  # the batches run there
        trace = Trace(request_id="traced")
        before = time.monotonic()
        assert await front.service.predict(rows(1), 10, trace=trace) == [4.0]
        after = time.monotonic()
    (batch,) = [span for span in exporter.get_finished_spans() if span.name == "batch"]
    # The span's context crossed the socket, and the pass's start on the shared clock.
    assert trace.links == (batch.context,)
    assert before <= trace.started <= after
    assert (trace.batches, trace.batch_size) == (1, 1)
