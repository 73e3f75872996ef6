"""Request deadlines on one timer: each fires once, in order, and only while wanted."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gpuserve.core.deadlines import Deadlines

pytestmark = pytest.mark.anyio


class TimerCount:
    """Counts the timers armed on the running loop."""

    def __init__(self) -> None:
        self.loop: Any = asyncio.get_running_loop()
        self.armed = 0
        self._call_at = self.loop.call_at

        def call_at(when: float, callback: Any, *args: Any) -> Any:
            self.armed += 1
            return self._call_at(when, callback, *args)

        self.loop.call_at = call_at

    def restore(self) -> None:
        del self.loop.call_at


async def test_a_deadline_fires_once_and_a_discarded_one_never() -> None:
    deadlines = Deadlines()
    fired: list[str] = []
    deadlines.add(0.01, lambda: fired.append("late"))
    kept = deadlines.add(0.01, lambda: fired.append("answered in time"))
    deadlines.discard(kept)
    await asyncio.sleep(0.3)
    assert fired == ["late"] and len(deadlines) == 0


async def test_requests_sharing_a_timeout_share_one_timer() -> None:
    deadlines = Deadlines()
    count = TimerCount()
    try:
        keys = [deadlines.add(30.0, lambda: None) for _ in range(100)]
    finally:
        count.restore()
    assert count.armed == 1 and len(deadlines) == 100
    for key in keys:
        deadlines.discard(key)
    deadlines.close()


async def test_an_earlier_deadline_fires_first_whenever_it_was_added() -> None:
    deadlines = Deadlines()
    fired: list[str] = []
    deadlines.add(0.2, lambda: fired.append("long"))
    deadlines.add(0.02, lambda: fired.append("short"))  # added later, due sooner
    await asyncio.sleep(0.1)
    assert fired == ["short"]
    await asyncio.sleep(0.4)
    assert fired == ["short", "long"]


async def test_the_timer_moves_on_to_the_live_requests_when_its_own_has_finished() -> None:
    # The steady state: the armed deadline's request was answered long ago; the requests
    # then in flight must still be timed.
    deadlines = Deadlines()
    fired: list[str] = []
    answered = deadlines.add(0.02, lambda: fired.append("answered"))
    deadlines.add(0.15, lambda: fired.append("still waiting"))
    deadlines.discard(answered)
    await asyncio.sleep(0.5)
    assert fired == ["still waiting"]


async def test_closing_stops_every_deadline() -> None:
    deadlines = Deadlines()
    fired: list[str] = []
    deadlines.add(0.02, lambda: fired.append("late"))
    deadlines.close()
    await asyncio.sleep(0.2)
    assert fired == [] and len(deadlines) == 0


def test_a_new_event_loop_gets_its_own_timer() -> None:
    deadlines = Deadlines()
    fired: list[int] = []

    async def wait(run: int) -> None:
        deadlines.add(30.0 if run == 0 else 0.01, lambda: fired.append(run))
        await asyncio.sleep(0.2 if run else 0)

    asyncio.run(wait(0))  # its loop closes with the 30 s timer armed
    asyncio.run(wait(1))  # an earlier armed time must not stop this one's from firing
    assert fired == [1]
