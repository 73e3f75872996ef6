"""The step counters of `scripts/cpu_stages.py --counters` (`scripts/_stage_timers.py`)."""

from __future__ import annotations

import asyncio
import importlib.util
from types import ModuleType
from typing import Any

import pytest

from .helpers import ROOT


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "_stage_timers", ROOT / "scripts/_stage_timers.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


timers = _load()


@pytest.fixture(autouse=True)
def _fresh_totals() -> None:
    timers._TOTALS.clear()


class Steps:
    async def three(self, future: asyncio.Future[int]) -> int:
        first = await future
        await asyncio.sleep(0)
        return first + 1

    async def fails(self) -> None:
        await asyncio.sleep(0)
        raise ValueError("from inside")


timers._wrap(Steps, "three", "three")
timers._wrap(Steps, "fails", "fails")


def test_an_error_thrown_in_reaches_the_counted_coroutine() -> None:
    loop = asyncio.new_event_loop()
    try:
        future: asyncio.Future[int] = loop.create_future()
        coroutine = Steps().three(future)
        assert coroutine.send(None) is future
        with pytest.raises(KeyError, match="thrown in"):
            coroutine.throw(KeyError("thrown in"))
    finally:
        loop.close()
    assert timers._TOTALS["three"][0] == 1


@pytest.mark.anyio
async def test_a_counted_coroutine_returns_raises_and_is_cancelled_as_before() -> None:
    steps = Steps()
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(steps.three(future))
    await asyncio.sleep(0)
    future.set_result(41)
    assert await task == 42
    with pytest.raises(ValueError, match="from inside"):
        await steps.fails()
    waiting: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    cancelled = asyncio.ensure_future(steps.three(waiting))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert waiting.cancelled()  # the cancellation reached the awaited future
    calls, nanoseconds = timers._TOTALS["three"]
    assert calls == 2 and nanoseconds > 0
    assert timers._TOTALS["fails"][0] == 1


def test_a_counted_function_counts_only_the_event_loop_thread() -> None:
    import threading

    counted: Any = timers._counted(lambda x: x * 2, "double")
    assert counted(21) == 42
    worker = threading.Thread(target=counted, args=(1,))
    worker.start()
    worker.join()
    assert timers._TOTALS["double"][0] == 1
