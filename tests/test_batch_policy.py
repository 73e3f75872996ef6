"""The batch formation policy on its own, on a clock the test moves: the hold for calls that
stream in one at a time, and its back-off for a lone client."""

from __future__ import annotations

import math

import pytest

from gpuserve.core import batch_policy
from gpuserve.core.batch_policy import FormationPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(batch_policy.time, "monotonic", fake)
    return fake


def policy(hold: bool = True, max_wait_s: float = 0.002) -> FormationPolicy:
    return FormationPolicy(32, max_wait_s, hold_for_callers=hold, overlap=False, oom_cooldown_s=1)


def idle_until(p: FormationPolicy, waiting: int, oldest: float) -> float | None:
    """`open_until` at an idle worker with nothing in flight."""
    return p.open_until(waiting, oldest, all_busy=lambda: False, in_flight=lambda: 0)


def test_calls_streaming_in_one_at_a_time_hold_an_idle_worker_until_they_pause(
    clock: Clock,
) -> None:
    p = policy()
    p.finished(held=1, started=clock.now - 0.0001)  # nobody due back
    for _ in range(9):  # a stream: calls 0.2 ms apart
        clock.now += 0.0002
        p.arrived()
    oldest = clock.now
    assert idle_until(p, 1, oldest) == pytest.approx(clock.now + 0.0004)
    clock.now += 0.0002
    p.arrived()  # the next call came within the window: the hold goes on from it
    assert idle_until(p, 2, oldest) == pytest.approx(clock.now + 0.0004)
    clock.now += 0.00041  # then nothing for twice the gap: the batch goes
    assert idle_until(p, 2, oldest) is None
    p.dispatched(2)
    # The hold caught a call, so the next batch holds too.
    clock.now += 0.0002
    p.arrived()
    assert idle_until(p, 1, clock.now) is not None


def test_a_stream_hold_ends_at_max_wait_however_fast_calls_come(clock: Clock) -> None:
    p = policy(max_wait_s=0.002)
    p.finished(held=1, started=clock.now)
    for _ in range(8):  # earlier calls of the stream
        clock.now += 0.0001
        p.arrived()
    oldest = clock.now + 0.0001
    for waiting in range(1, 31):
        clock.now += 0.0001
        p.arrived()
        if clock.now < oldest + 0.002:
            assert idle_until(p, waiting, oldest) == pytest.approx(
                min(clock.now + 0.0002, oldest + 0.002)
            )
        else:
            assert idle_until(p, waiting, oldest) is None


def test_a_lone_client_pays_a_hold_about_once_in_a_thousand_calls(clock: Clock) -> None:
    p = policy(max_wait_s=0.002)
    held = 0
    for _ in range(5000):  # one call at a time, 1 ms apart: a stream by its gap alone
        clock.now += 0.001
        p.arrived()
        arrived = clock.now
        until = idle_until(p, 1, arrived)
        if until is not None:
            held += 1
            assert until == pytest.approx(arrived + 0.002)  # twice the gap, within max_wait
            clock.now = until
            assert idle_until(p, 1, arrived) is None
        p.dispatched(1)
        p.finished(held=1, started=clock.now)
    # 1, 2, 4 ... 1024 batches between holds: 11 holds to reach the longest skip, then one
    # in 1025.
    assert 11 <= held <= 11 + 5000 // 1025 + 1


@pytest.mark.parametrize("hold, gap", [(True, 0.0025), (True, 0.01), (False, 0.0001)])
def test_no_stream_hold_for_calls_a_max_wait_apart_or_with_the_hold_off(
    clock: Clock, hold: bool, gap: float
) -> None:
    p = policy(hold=hold, max_wait_s=0.002)
    for _ in range(10):
        clock.now += gap
        p.arrived()
        p.finished(held=1, started=clock.now)
        assert idle_until(p, 1, clock.now) is None
        p.dispatched(1)


def test_a_burst_after_a_pause_is_no_stream(clock: Clock) -> None:
    p = policy(max_wait_s=0.05)
    for _ in range(20):  # bursts of four, 0.2 s apart
        clock.now += 0.2
        for _ in range(4):
            p.arrived()
        assert idle_until(p, 4, clock.now) is None
        p.dispatched(4)


def test_the_first_call_is_never_held(clock: Clock) -> None:
    p = policy(max_wait_s=math.inf)
    p.arrived()
    assert idle_until(p, 1, clock.now) is None


def test_callers_due_back_are_held_for_at_their_pace_past_one_pass(clock: Clock) -> None:
    # A batch of 8 ran 0.5 ms; its callers come back 0.25 ms apart (gRPC's, each paying a
    # thread's wake-up): all 8 take 2 ms, four passes. One pass of hold would split them.
    p = policy(max_wait_s=0.005)
    p.finished(held=8, started=clock.now - 0.0005)
    freed = clock.now
    for back in range(1, 8):
        clock.now += 0.00025
        p.arrived()
        # Open for 1.5x the 8 callers' time at that pace, from when the worker came free.
        assert idle_until(p, back, freed) == pytest.approx(freed + 1.5 * 8 * 0.00025)
    clock.now += 0.00025
    p.arrived()
    # All back: no more wait for them; only the stream rule's, two gaps past the last call.
    assert idle_until(p, 8, freed) == pytest.approx(clock.now + 2 * 0.00025)


def test_the_hold_for_callers_due_back_ends_at_max_wait(clock: Clock) -> None:
    p = policy(max_wait_s=0.002)
    p.finished(held=32, started=clock.now - 0.0005)
    freed = clock.now
    clock.now += 0.0003
    p.arrived()  # at that pace the other 31 would take 10 ms: held 2 ms, not 10
    assert idle_until(p, 1, freed) == pytest.approx(freed + 0.002)
    clock.now = freed + 0.002
    assert idle_until(p, 1, freed) is None


def test_callers_that_left_are_waited_for_one_pass_when_the_rest_came_back_at_once(
    clock: Clock,
) -> None:
    # Callers that came back in a burst (HTTP's, read in one turn of the loop) set a quick
    # pace: when some then stop coming, the batch waits one pass for them, not max_wait.
    p = policy(max_wait_s=3600.0)
    p.finished(held=4, started=clock.now - 0.001)
    for _ in range(4):
        clock.now += 0.00001
        p.arrived()
    p.dispatched(4)
    clock.now += 0.001
    p.finished(held=4, started=clock.now - 0.001)
    freed = clock.now
    clock.now += 0.00001
    p.arrived()  # one of the four; three never come
    assert idle_until(p, 1, freed) == pytest.approx(freed + 0.001)
    clock.now = freed + 0.001
    assert idle_until(p, 1, freed) is None
