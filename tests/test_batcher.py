"""MicroBatcher with a fake process function: batching, routing, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from gpuserve.core.batcher import BatchStats, MicroBatcher, Trace
from gpuserve.core.errors import BatcherClosed, InferenceError, Overloaded

pytestmark = pytest.mark.anyio


class GatedDoubler:
    """Doubles each item. While the gate is closed, the worker blocks inside the forward pass."""

    def __init__(self, poison: int | None = None) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batches: list[list[int]] = []
        self.poison = poison

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        if not self.gate.wait(timeout=30):
            raise TimeoutError("test gate never opened")
        if self.poison is not None and self.poison in items:
            raise ValueError(f"poisoned by {self.poison}")
        return [item * 2 for item in items]


async def wait_until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until `condition` holds; bounded so a bug cannot hang the suite."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


async def started(
    process: Callable[[list[int]], list[int]], **options: Any
) -> MicroBatcher[int, int]:
    options = {"max_batch_size": 8, "max_wait_s": 3600.0, **options}
    batcher: MicroBatcher[int, int] = MicroBatcher(process, **options)
    await batcher.start()
    return batcher


async def hold_worker(model: GatedDoubler, batcher: MicroBatcher[int, int]) -> asyncio.Future[int]:
    """Close the gate and put one item in the worker, so later submits must queue."""
    model.gate.clear()
    model.entered.clear()
    first = batcher.submit(-1)
    await wait_until(model.entered.is_set)
    return first


async def test_lone_request_is_dispatched_without_waiting_for_the_timer() -> None:
    model = GatedDoubler()
    batcher = await started(model, max_wait_s=3600.0)
    # With an hour-long max_wait, only the idle-dispatch rule can answer within the bound.
    assert await asyncio.wait_for(batcher.submit(21), timeout=10) == 42
    assert model.batches == [[21]]
    await batcher.stop()


async def test_concurrent_submits_share_forward_passes() -> None:
    model = GatedDoubler()
    batcher = await started(model, max_batch_size=64)
    first = await hold_worker(model, batcher)
    futures = [batcher.submit(i) for i in range(20)]
    model.gate.set()
    assert await asyncio.gather(*futures) == [i * 2 for i in range(20)]
    assert await first == -2
    assert len(model.batches) < 21
    assert model.batches[1] == list(range(20))
    await batcher.stop()


async def test_batches_never_exceed_max_batch_size() -> None:
    model = GatedDoubler()
    batcher = await started(model, max_batch_size=4)
    first = await hold_worker(model, batcher)
    futures = [batcher.submit(i) for i in range(50)]
    model.gate.set()
    await asyncio.gather(first, *futures)
    assert max(len(batch) for batch in model.batches) == 4
    assert sorted(item for batch in model.batches for item in batch) == [-1, *range(50)]
    await batcher.stop()


async def test_buckets_keep_apart_and_each_keeps_its_queue_order() -> None:
    model = GatedDoubler()
    # Bucket by tens: 3, 5 and 7 may share a batch; 15 and 17 may not join them.
    batcher = await started(model, max_batch_size=2, bucket_of=lambda item: item // 10)
    first = await hold_worker(model, batcher)
    futures = batcher.submit_many([3, 15, 5, 17, 7])
    model.gate.set()
    assert await asyncio.gather(*futures) == [6, 30, 10, 34, 14]
    await first
    # Oldest first, capped at 2, and the oldest waiting item's bucket decides each batch.
    assert model.batches[1:] == [[3, 5], [15, 17], [7]]
    await batcher.stop()


async def test_a_trace_records_what_a_requests_batches_cost() -> None:
    model = GatedDoubler()
    batcher = await started(model, max_batch_size=3)
    first = await hold_worker(model, batcher)
    trace = Trace()
    futures = batcher.submit_many([1, 2, 3, 4], trace)  # two batches: 3 items, then 1
    model.gate.set()
    await asyncio.gather(first, *futures)
    assert (trace.batches, trace.batch_size) == (2, 3)
    assert trace.queue_wait_s > 0 and trace.forward_s > 0
    await batcher.stop()


async def test_with_several_workers_a_batch_goes_to_the_least_loaded() -> None:
    first_copy, second_copy = GatedDoubler(), GatedDoubler()
    stats: list[BatchStats] = []
    batcher: MicroBatcher[int, int] = MicroBatcher(
        [first_copy, second_copy], max_batch_size=4, max_wait_s=3600.0, on_batch=stats.append
    )
    await batcher.start()
    assert batcher.workers == 2
    held = await hold_worker(first_copy, batcher)  # the first batch goes to the first copy
    # The second copy is idle: the next request is dispatched to it at once, not held.
    assert await asyncio.wait_for(batcher.submit(5), 10) == 10
    assert second_copy.batches == [[5]] and first_copy.batches == [[-1]]
    # Both busy, then both free: work spreads over the two and every answer is right.
    second_copy.gate.clear()
    futures = batcher.submit_many(list(range(12)))
    await wait_until(lambda: len(second_copy.batches) > 1)
    first_copy.gate.set()
    second_copy.gate.set()
    assert await asyncio.gather(*futures) == [i * 2 for i in range(12)]
    assert await held == -2
    assert {s.worker for s in stats} == {0, 1}
    await batcher.stop()


def test_a_batcher_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one process"):
        MicroBatcher([], max_batch_size=1, max_wait_s=0)


class TwoStage(GatedDoubler):
    """A worker with prepare and run stages: prepare may run while another batch runs."""

    def __init__(self, poison: int | None = None) -> None:
        super().__init__(poison)
        self.prepared: list[list[int]] = []
        self.prepared_while_running = threading.Event()

    def prepare(self, items: list[int]) -> list[int]:
        if not self.gate.is_set():  # a forward pass is being held right now
            self.prepared_while_running.set()
        self.prepared.append(list(items))
        return [item * 2 for item in items]

    def run(self, prepared: list[int]) -> list[int]:
        if not self.gate.wait(timeout=30):
            raise TimeoutError("test gate never opened")
        if self.poison is not None and self.poison * 2 in prepared:
            raise ValueError(f"poisoned by {self.poison}")
        return prepared


async def test_the_waiting_batch_is_prepared_while_the_running_one_computes() -> None:
    model = TwoStage()
    batcher = await started(model, max_batch_size=3)  # full at once: staged behind the first
    first = await hold_worker(model, batcher)  # __call__ path: the worker was idle
    futures = batcher.submit_many([1, 2, 3])
    await wait_until(model.prepared_while_running.is_set)
    assert model.prepared == [[1, 2, 3]]
    model.gate.set()
    assert await asyncio.gather(*futures) == [2, 4, 6]
    assert await first == -2
    await batcher.stop()


async def test_a_prepared_batch_that_fails_is_retried_in_halves() -> None:
    model = TwoStage(poison=2)
    batcher = await started(model, max_batch_size=3)
    first = await hold_worker(model, batcher)
    futures = batcher.submit_many([1, 2, 3])
    await wait_until(model.prepared_while_running.is_set)
    model.gate.set()
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], ValueError)
    await first
    await batcher.stop()


async def test_each_caller_gets_its_own_result() -> None:
    batcher = await started(lambda items: [f"out-{item}" for item in items])  # type: ignore[arg-type,misc]
    values = list(range(100))
    results = await asyncio.gather(*(batcher.submit(v) for v in values))
    assert list(results) == [f"out-{v}" for v in values]
    await batcher.stop()


async def test_a_failing_item_fails_alone_and_its_neighbours_get_results() -> None:
    model = GatedDoubler(poison=7)
    batcher = await started(model, max_batch_size=3)
    first = await hold_worker(model, batcher)
    batched = [batcher.submit(i) for i in (5, 6, 7)]  # a full batch: staged behind the first
    await wait_until(lambda: batcher.queue_depth == 0)
    later = [batcher.submit(i) for i in (8, 9)]
    model.gate.set()
    results = await asyncio.gather(first, *batched, *later, return_exceptions=True)
    assert results[:3] == [-2, 10, 12]
    assert isinstance(results[3], ValueError)
    assert results[4:] == [16, 18]
    # The failed batch was retried in halves until the poisoned item stood alone.
    assert model.batches == [[-1], [5, 6, 7], [5], [6, 7], [6], [7], [8, 9]]
    await batcher.stop()


async def test_out_of_memory_splits_the_batch_and_caps_later_ones() -> None:
    seen: list[BatchStats] = []

    def small_memory(items: list[int]) -> list[int]:
        if len(items) > 2:
            raise MemoryError(f"no room for {len(items)}")
        return [item + 1 for item in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(
        small_memory, max_batch_size=8, max_wait_s=3600, oom_cooldown_s=3600, on_batch=seen.append
    )
    await batcher.start()
    assert await asyncio.gather(*batcher.submit_many(list(range(8)))) == list(range(1, 9))
    assert (seen[0].size, seen[0].oom_splits, seen[0].failed_items) == (8, 3, 0)
    assert batcher.batch_cap == 4
    await asyncio.gather(*batcher.submit_many(list(range(8))))
    assert max(s.size for s in seen[1:]) <= 4
    await batcher.stop()


async def test_a_custom_oom_test_is_used() -> None:
    seen: list[BatchStats] = []

    def flaky(items: list[int]) -> list[int]:
        if len(items) > 1:
            raise RuntimeError("CUDA out of memory")
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(
        flaky,
        max_batch_size=4,
        max_wait_s=3600,
        is_oom=lambda exc: "out of memory" in str(exc),
        on_batch=seen.append,
    )
    await batcher.start()
    await asyncio.gather(*batcher.submit_many([1, 2]))
    assert seen[0].oom_splits == 1 and batcher.batch_cap == 1
    await batcher.stop()


async def test_a_full_queue_refuses_at_once_and_admits_all_or_none() -> None:
    model = GatedDoubler()
    batcher = await started(model, max_queue_size=3)
    first = await hold_worker(model, batcher)
    await wait_until(lambda: batcher.queue_depth == 0)
    admitted = batcher.submit_many([1, 2])
    with pytest.raises(Overloaded, match="queue is full"):
        batcher.submit_many([3, 4])
    assert batcher.queue_depth == 2  # the refused request left nothing behind
    admitted.append(batcher.submit(3))
    with pytest.raises(Overloaded):
        batcher.submit(4)
    model.gate.set()
    assert await asyncio.gather(first, *admitted) == [-2, 2, 4, 6]
    await batcher.stop()


async def test_the_batches_watchdogs_share_one_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A timer per batch cost every lone request 2-3 µs to arm and cancel; one serves all."""
    batcher = await started(lambda items: items, forward_timeout_s=60.0, max_wait_s=0.0)
    loop = asyncio.get_running_loop()
    armed: list[Any] = []
    call_at = loop.call_at

    def counting_call_at(when: float, callback: Any, *args: Any, **kwargs: Any) -> Any:
        armed.append(callback)
        return call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counting_call_at)
    for item in range(20):  # one at a time: 20 batches of one
        assert await batcher.submit(item) == item
    monkeypatch.undo()
    await batcher.stop()
    assert len(armed) == 1, armed


async def test_a_stuck_forward_fails_waiters_and_recovers_when_it_returns() -> None:
    model = GatedDoubler()
    batcher = await started(model, forward_timeout_s=0.05, max_wait_s=0.0)
    first = await hold_worker(model, batcher)
    queued = batcher.submit(1)
    for future in (first, queued):
        with pytest.raises(BatcherClosed, match=r"more than 0\.05s"):
            await asyncio.wait_for(future, timeout=10)
    assert batcher.error is not None and not batcher.running
    with pytest.raises(BatcherClosed):
        batcher.submit(2)
    model.gate.set()
    await wait_until(lambda: batcher.running)
    assert await asyncio.wait_for(batcher.submit(3), timeout=10) == 6
    await batcher.stop()


async def test_one_stuck_copy_fails_its_batch_and_the_other_copies_keep_serving() -> None:
    stuck, healthy = GatedDoubler(), GatedDoubler()
    batcher: MicroBatcher[int, int] = MicroBatcher(
        [stuck, healthy], max_batch_size=4, max_wait_s=0.0, forward_timeout_s=0.05
    )
    await batcher.start()
    first = await hold_worker(stuck, batcher)
    with pytest.raises(BatcherClosed, match=r"more than 0\.05s"):
        await asyncio.wait_for(first, timeout=10)
    # Still serving, on the other copy only, and still ready.
    assert batcher.running and batcher.error is None
    assert await asyncio.wait_for(asyncio.gather(*batcher.submit_many([1, 2])), 10) == [2, 4]
    assert stuck.batches == [[-1]] and healthy.batches[-1] == [1, 2]
    # When the stuck pass returns, its copy takes work again (both idle: the first copy).
    stuck.gate.set()
    await wait_until(lambda: not batcher._stuck)
    healthy.gate.clear()  # a batch sent to the healthy copy now would wait: none must be
    assert await asyncio.wait_for(batcher.submit(7), 10) == 14
    assert stuck.batches[-1] == [7]
    healthy.gate.set()
    await batcher.stop()


def declare_stuck(batcher: MicroBatcher[int, int], batch: Any) -> None:
    """Run the watchdog's check now on `batch`, as if its pass had run past the timeout."""
    batcher.forward_timeout_s = 0.0
    batch.started = time.monotonic() - 1
    batcher._check_stalled(batch)


async def test_the_batch_staged_on_a_stuck_copy_goes_back_to_the_queue() -> None:
    stuck, other = GatedDoubler(), GatedDoubler()
    # No watchdog of its own: the test declares the pass stuck when it chooses.
    batcher: MicroBatcher[int, int] = MicroBatcher(
        [stuck, other], max_batch_size=1, max_wait_s=0.0, forward_timeout_s=None
    )
    await batcher.start()
    first = await hold_worker(stuck, batcher)  # runs on copy 0
    other.gate.clear()
    second = batcher.submit(2)  # copy 1, idle, takes it
    await wait_until(lambda: other.batches == [[2]])
    staged = batcher.submit(3)  # both busy: staged behind copy 0's pass (least loaded, first)
    await wait_until(lambda: len(batcher._in_flight) == 3)
    assert [b.worker for b in batcher._in_flight] == [0, 1, 0]
    declare_stuck(batcher, batcher._in_flight[0])
    with pytest.raises(BatcherClosed):
        await first
    other.gate.set()  # copy 1 finishes, then runs the batch handed back from copy 0
    assert await asyncio.wait_for(asyncio.gather(second, staged), 10) == [4, 6]
    assert other.batches == [[2], [3]] and stuck.batches == [[-1]]
    stuck.gate.set()
    await batcher.stop()


async def test_a_batch_handed_back_from_a_stuck_copy_keeps_the_queue_in_level_order() -> None:
    stuck, other = GatedDoubler(), GatedDoubler()
    batcher: MicroBatcher[int, int] = MicroBatcher(
        [stuck, other], max_batch_size=2, max_wait_s=0.0, forward_timeout_s=None
    )
    await batcher.start()
    first = await hold_worker(stuck, batcher)  # runs on copy 0
    other.gate.clear()
    running = batcher.submit(2)  # copy 1 takes it
    await wait_until(lambda: other.batches == [[2]])
    mixed = [*batcher.submit_many([3], level=0), *batcher.submit_many([4], level=1)]
    await wait_until(lambda: len(batcher._in_flight) == 3)  # [3, 4] staged on copy 0
    behind = batcher.submit_many([6], level=1)
    await wait_until(lambda: len(batcher._in_flight) == 4)  # [6] staged on copy 1
    urgent = batcher.submit_many([5], level=0)  # queued: every copy has a batch staged
    declare_stuck(batcher, batcher._in_flight[0])
    with pytest.raises(BatcherClosed):
        await first
    other.gate.set()
    await asyncio.wait_for(asyncio.gather(running, *mixed, *behind, *urgent), 10)
    # [3, 4] went back each at the head of its level: 5 (level 0) still goes before 4.
    assert other.batches == [[2], [6], [3, 5], [4]]
    stuck.gate.set()
    await batcher.stop()


async def test_a_wrong_number_of_results_fails_the_batch() -> None:
    batcher = await started(lambda items: items[:-1])
    with pytest.raises(RuntimeError, match="returned 0 results for a batch of 1"):
        await batcher.submit(1)
    await batcher.stop()


async def test_a_collector_crash_fails_pending_requests_and_closes_the_batcher() -> None:
    model = GatedDoubler()
    batcher = await started(model, max_wait_s=0.0)
    first = await hold_worker(model, batcher)

    def broken_dispatch() -> None:
        raise RuntimeError("collector bug")

    batcher._dispatch = broken_dispatch  # type: ignore[method-assign]
    waiting = batcher.submit(3)
    with pytest.raises(BatcherClosed, match="collector crashed"):
        await asyncio.wait_for(waiting, timeout=10)
    assert batcher.error is not None and "collector bug" in batcher.error
    assert not batcher.running
    with pytest.raises(BatcherClosed):
        batcher.submit(4)
    model.gate.set()
    assert await first == -2  # the batch already in the worker still gets its answer
    await batcher.stop()


async def test_max_wait_hands_a_batch_to_the_busy_worker_early() -> None:
    model = GatedDoubler()
    batcher = await started(model, max_wait_s=0.0)
    first = await hold_worker(model, batcher)
    second = batcher.submit(1)
    await wait_until(lambda: batcher.queue_depth == 0)  # staged at once: max_wait is zero
    third = batcher.submit(2)
    model.gate.set()
    assert await asyncio.gather(first, second, third) == [-2, 2, 4]
    assert model.batches == [[-1], [1], [2]]
    await batcher.stop()


async def test_a_batch_keeps_growing_while_the_worker_is_busy_and_max_wait_allows() -> None:
    model = GatedDoubler()
    batcher = await started(model, max_wait_s=3600.0)
    first = await hold_worker(model, batcher)
    second = batcher.submit(1)
    for _ in range(5):
        await asyncio.sleep(0)
    third = batcher.submit(2)
    model.gate.set()
    assert await asyncio.gather(first, second, third) == [-2, 2, 4]
    assert model.batches == [[-1], [1, 2]]
    await batcher.stop()


@pytest.mark.parametrize(
    ("overlap", "batches"), [(True, [[-1], [1], [2]]), (False, [[-1], [1, 2]])]
)
async def test_without_overlap_a_batch_behind_a_busy_worker_grows_until_the_worker_is_free(
    overlap: bool, batches: list[list[int]]
) -> None:
    # With overlap, the waiting batch goes to the busy worker once max_wait has passed, so
    # that it starts the moment the running pass ends. Where the pass and the event loop
    # share the cores nothing overlaps, and handing it over would only split the batch.
    model = GatedDoubler()
    batcher = await started(model, max_wait_s=0.01, overlap=overlap)
    first = await hold_worker(model, batcher)
    second = batcher.submit(1)
    await asyncio.sleep(0.1)  # ten times max_wait
    assert batcher.queue_depth == (0 if overlap else 1)
    third = batcher.submit(2)
    model.gate.set()
    assert await asyncio.gather(first, second, third) == [-2, 2, 4]
    assert model.batches == batches
    await batcher.stop()


async def test_without_overlap_a_full_batch_still_goes_to_the_busy_worker_at_once() -> None:
    model = GatedDoubler()
    batcher = await started(model, max_batch_size=2, overlap=False)
    first = await hold_worker(model, batcher)
    full = [batcher.submit(1), batcher.submit(2)]
    await wait_until(lambda: batcher.queue_depth == 0)  # staged behind the running pass
    late = batcher.submit(3)
    model.gate.set()
    assert await asyncio.gather(first, *full, late) == [-2, 2, 4, 6]
    assert model.batches == [[-1], [1, 2], [3]]
    await batcher.stop()


async def run_one_batch(
    model: GatedDoubler, batcher: MicroBatcher[int, int], items: list[int], seconds: float
) -> None:
    """Run `items` as one batch whose forward pass takes at least `seconds`."""
    model.gate.clear()
    model.entered.clear()
    futures = [batcher.submit(item) for item in items]  # one turn of the loop: one batch
    await wait_until(model.entered.is_set)
    await asyncio.sleep(seconds)
    model.gate.set()
    assert await asyncio.gather(*futures) == [item * 2 for item in items]
    assert model.batches[-1] == items


async def test_callers_coming_back_one_by_one_fill_the_next_batch() -> None:
    # A batch of four finishes; its callers come back a millisecond apart, as they do once
    # the event loop has sent each its answer. Dispatching the first at once would split the
    # next batch into [4] and [5, 6, 7], and halves from then on.
    model = GatedDoubler()
    batcher = await started(model, max_batch_size=8, max_wait_s=3600.0)
    await run_one_batch(model, batcher, [0, 1, 2, 3], seconds=0.5)
    again = []
    for item in range(4, 8):
        again.append(batcher.submit(item))
        await asyncio.sleep(0.001)
    assert await asyncio.gather(*again) == [8, 10, 12, 14]
    assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    await batcher.stop()


async def test_an_idle_worker_waits_for_absent_callers_no_longer_than_the_last_pass() -> None:
    model = GatedDoubler()
    batcher = await started(model, max_batch_size=8, max_wait_s=3600.0)
    await run_one_batch(model, batcher, [0, 1, 2, 3], seconds=0.05)
    # One of the four comes back: it waits at most as long as their pass took, not an hour.
    assert await asyncio.wait_for(batcher.submit(4), timeout=10) == 8
    # Its batch of one says a lone caller is left: the next request goes at once.
    assert await asyncio.wait_for(batcher.submit(5), timeout=10) == 10
    assert model.batches == [[0, 1, 2, 3], [4], [5]]
    await batcher.stop()


async def test_the_hold_does_not_wait_for_callers_still_running_on_another_copy() -> None:
    slow, quick = GatedDoubler(), GatedDoubler()
    batcher = await started([slow, quick], max_batch_size=8)
    slow.gate.clear()
    running = [batcher.submit(item) for item in (0, 1, 2, 3)]  # to the first copy
    await wait_until(slow.entered.is_set)
    quick.gate.clear()
    pair = [batcher.submit(item) for item in (4, 5)]  # to the second, idle copy
    await wait_until(quick.entered.is_set)
    await asyncio.sleep(0.2)  # a pass long enough for the hold to matter
    quick.gate.set()
    assert await asyncio.gather(*pair) == [8, 10]
    # Six were in hand when the pair finished, but four of them still run on the first copy:
    # only the pair's two callers are due back, and the batch goes once both are.
    back = [batcher.submit(6), batcher.submit(7)]
    for _ in range(5):
        await asyncio.sleep(0)
    late = batcher.submit(8)
    assert await asyncio.gather(*back, late) == [12, 14, 16]
    assert quick.batches == [[4, 5], [6, 7], [8]]
    slow.gate.set()
    assert await asyncio.gather(*running) == [0, 2, 4, 6]
    assert slow.batches == [[0, 1, 2, 3]]
    await batcher.stop()


async def test_max_wait_counts_from_when_the_worker_is_free_not_from_arrival() -> None:
    # A request that came while the worker was busy has waited past max_wait by the time the
    # worker is free; that wait was for the worker, not for its batch to fill, so the hold for
    # the callers due back still applies to it.
    model = GatedDoubler()
    batcher = await started(model, max_batch_size=8, max_wait_s=0.05, overlap=False)
    model.gate.clear()
    model.entered.clear()
    running = [batcher.submit(item) for item in (0, 1, 2, 3)]
    await wait_until(model.entered.is_set)
    newcomer = batcher.submit(4)
    await asyncio.sleep(0.2)  # four times max_wait, behind the running pass
    model.gate.set()
    assert await asyncio.gather(*running) == [0, 2, 4, 6]
    back = []
    for item in (5, 6, 7, 8):  # the four callers come back a millisecond apart
        back.append(batcher.submit(item))
        await asyncio.sleep(0.001)
    assert await asyncio.gather(newcomer, *back) == [8, 10, 12, 14, 16]
    assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    await batcher.stop()


@pytest.mark.parametrize(
    "options", [{"max_wait_s": 0.0}, {"max_wait_s": 3600.0, "hold_for_callers": False}]
)
async def test_without_the_hold_the_first_caller_back_goes_alone(options: dict[str, Any]) -> None:
    model = GatedDoubler()
    batcher = await started(model, max_batch_size=8, **options)
    await run_one_batch(model, batcher, [0, 1, 2, 3], seconds=0.2)
    first_back = batcher.submit(4)
    for _ in range(5):  # a few turns of the loop: far inside the hold's 0.2 s
        await asyncio.sleep(0)
    rest = [batcher.submit(item) for item in (5, 6, 7)]
    assert await asyncio.gather(first_back, *rest) == [8, 10, 12, 14]
    assert model.batches == [[0, 1, 2, 3], [4], [5, 6, 7]]
    await batcher.stop()


async def test_a_cancelled_request_never_reaches_the_model() -> None:
    model = GatedDoubler()
    batcher = await started(model)
    first = await hold_worker(model, batcher)
    gone = batcher.submit(100)
    kept = batcher.submit(200)
    gone.cancel()
    model.gate.set()
    assert await kept == 400
    await first
    assert all(100 not in batch for batch in model.batches)
    await batcher.stop()


async def test_stop_answers_everything_already_accepted() -> None:
    model = GatedDoubler()
    batcher = await started(model, max_batch_size=2)
    first = await hold_worker(model, batcher)
    futures = [batcher.submit(i) for i in range(7)]
    stopping = asyncio.create_task(batcher.stop(timeout_s=30))
    await wait_until(lambda: not batcher.running)
    with pytest.raises(BatcherClosed, match="shutting down"):
        batcher.submit(99)
    model.gate.set()
    await stopping
    assert await first == -2
    assert [f.result() for f in futures] == [i * 2 for i in range(7)]


async def test_stop_fails_what_it_cannot_finish_in_time() -> None:
    model = GatedDoubler()
    batcher = await started(model)
    first = await hold_worker(model, batcher)
    queued = batcher.submit(1)
    await batcher.stop(timeout_s=0.05)
    model.gate.set()
    for future in (first, queued):
        with pytest.raises(BatcherClosed, match="stopped before"):
            await future


async def test_on_batch_reports_each_batch_and_its_failures() -> None:
    seen: list[BatchStats] = []
    model = GatedDoubler(poison=3)
    batcher: MicroBatcher[int, int] = MicroBatcher(
        model, max_batch_size=8, max_wait_s=0.0, on_batch=seen.append
    )
    await batcher.start()
    assert await batcher.submit(1) == 2
    with pytest.raises(ValueError):
        await batcher.submit(3)
    await batcher.stop()
    assert [(s.size, s.failed_items) for s in seen] == [(1, 0), (1, 1)]
    assert all(s.forward_s >= 0 and s.queue_wait_s >= 0 for s in seen)


async def test_submit_before_start_is_refused() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(
        lambda items: items, max_batch_size=1, max_wait_s=0
    )
    with pytest.raises(BatcherClosed, match="not ready"):
        batcher.submit(1)


def test_invalid_sizes_are_rejected() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: items, max_batch_size=0, max_wait_s=0)
    with pytest.raises(ValueError):
        MicroBatcher(lambda items: items, max_batch_size=1, max_wait_s=-1)


async def test_a_staged_batch_skips_members_cancelled_before_it_starts() -> None:
    model = GatedDoubler()
    batcher = await started(model, max_wait_s=0.0)
    first = await hold_worker(model, batcher)
    gone, kept = batcher.submit(5), batcher.submit(6)
    await wait_until(lambda: batcher.queue_depth == 0)  # both handed to the worker's queue
    gone.cancel()
    model.gate.set()
    assert await first == -2 and await kept == 12
    assert model.batches == [[-1], [6]]
    await batcher.stop()


class Boom(BaseException):
    """A user's own BaseException subclass, as a model may raise."""


@pytest.mark.parametrize(
    "raised",
    [
        StopIteration("poison"),
        StopAsyncIteration("poison"),
        Boom("poison"),
        KeyboardInterrupt(),
        SystemExit(3),
        GeneratorExit(),
        asyncio.CancelledError(),
    ],
    ids=lambda exc: type(exc).__name__,
)
async def test_whatever_a_model_raises_fails_only_its_item(raised: BaseException) -> None:
    def model(items: list[int]) -> list[int]:
        if 3 in items:
            raise raised
        return [item * 2 for item in items]

    gated = GatedDoubler()
    batcher = await started(lambda items: gated(items) and model(items), max_batch_size=8)
    first = await hold_worker(gated, batcher)
    futures = [batcher.submit(i) for i in range(6)]
    gated.gate.set()
    with anyio.fail_after(10):
        assert await first == -2
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert [o for i, o in enumerate(outcomes) if i != 3] == [0, 2, 4, 8, 10]
    assert isinstance(outcomes[3], InferenceError)
    assert outcomes[3].__cause__ is raised
    assert batcher.running  # the bookkeeping did not stop halfway
    assert await batcher.submit(7) == 14
    await batcher.stop()


async def test_a_model_returning_an_exception_fails_that_item_only() -> None:
    batcher = await started(lambda items: [StopIteration() if i == 1 else i for i in items])
    futures = batcher.submit_many([0, 1, 2])
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert outcomes[0] == 0 and outcomes[2] == 2
    assert isinstance(outcomes[1], InferenceError)
    await batcher.stop()


async def test_expired_and_abandoned_requests_free_their_queue_places() -> None:
    model = GatedDoubler()
    batcher = await started(model, max_queue_size=4)
    first = await hold_worker(model, batcher)
    waiting = batcher.submit_many([1, 2, 3, 4])
    with pytest.raises(Overloaded):
        batcher.submit(5)
    # Two requests give up (a deadline, a hang-up): their places are free again at once.
    batcher.release(waiting[1:3])
    assert batcher.queue_depth == 2
    late = batcher.submit_many([6, 7])
    with pytest.raises(Overloaded, match="4 of 4 waiting"):
        batcher.submit(8)
    model.gate.set()
    with anyio.fail_after(10):
        assert await first == -2
        assert await asyncio.gather(waiting[0], waiting[3], *late) == [2, 8, 12, 14]
    assert all(future.cancelled() for future in waiting[1:3])
    await batcher.stop()


async def test_a_retry_in_halves_runs_after_the_failed_attempt_is_released() -> None:
    """The failed attempt's frames (and what they hold) are gone before the halves run."""
    import gc
    import weakref

    class Held:
        pass

    alive: list[bool] = []
    refs: list[weakref.ref[Held]] = []

    def model(items: list[int]) -> list[int]:
        if len(items) > 1:
            held = Held()  # stands for the failed attempt's activations
            refs.append(weakref.ref(held))
            raise MemoryError("too big")
        gc.collect()
        alive.append(any(ref() is not None for ref in refs))
        return items

    batcher = await started(model, max_batch_size=8)
    assert await asyncio.gather(*batcher.submit_many([1, 2])) == [1, 2]
    assert alive and not any(alive)
    await batcher.stop()


async def test_stopped_worker_threads_never_hold_the_process() -> None:
    stuck = threading.Event()
    batcher = await started(lambda items: stuck.wait(30) and items, forward_timeout_s=0.2)
    future = batcher.submit(1)
    with pytest.raises(BatcherClosed):
        await asyncio.wait_for(future, 10)
    threads = [t for t in threading.enumerate() if t.name.startswith("batcher-fwd")]
    assert threads and all(t.daemon for t in threads)
    await batcher.stop(timeout_s=0.1)
    stuck.set()


class DeviceBroken(RuntimeError):
    pass


def breaks_on(poison: int) -> Callable[[list[int]], list[int]]:
    def model(items: list[int]) -> list[int]:
        if poison in items:
            raise DeviceBroken("CUDA error: an illegal memory access was encountered")
        return [item * 2 for item in items]

    return model


async def test_a_fatal_error_retires_its_copy_and_the_others_serve() -> None:
    calls: list[int] = []

    def first(items: list[int]) -> list[int]:
        calls.append(len(items))
        return breaks_on(13)(items)

    batcher = await started(
        [first, breaks_on(-1)], is_fatal=lambda exc: isinstance(exc, DeviceBroken)
    )
    with pytest.raises(DeviceBroken):
        await batcher.submit(13)  # goes to copy 0, the least loaded: it breaks
    assert calls == [1]  # no retry in halves on a broken device
    assert batcher.error is None and batcher.running
    assert await asyncio.gather(*batcher.submit_many(list(range(5)))) == [0, 2, 4, 6, 8]
    assert calls == [1]  # copy 0 serves no more
    await batcher.stop()


async def test_a_fatal_error_on_the_last_copy_fails_the_batcher() -> None:
    batcher = await started(breaks_on(13), is_fatal=lambda exc: isinstance(exc, DeviceBroken))
    outcomes = await asyncio.gather(*batcher.submit_many([1, 13, 2]), return_exceptions=True)
    assert all(isinstance(o, DeviceBroken | RuntimeError) for o in outcomes)
    assert batcher.error is not None and "illegal memory access" in batcher.error
    assert not batcher.running
    with pytest.raises(BatcherClosed, match="illegal memory access"):
        batcher.submit(1)
    await batcher.stop()


async def test_a_later_batch_finishing_first_on_another_copy_is_answered_with_array_items() -> None:
    """Batches were compared field by field (`batch in in_flight`): numpy items raised there,
    and the requests of a batch that finished before an earlier one waited forever."""
    import numpy as np

    slow_gate = threading.Event()

    def slow(items: list[np.ndarray]) -> list[float]:
        slow_gate.wait(30)
        return [float(x.sum()) for x in items]

    def fast(items: list[np.ndarray]) -> list[float]:
        return [float(x.sum()) for x in items]

    batcher: MicroBatcher[Any, Any] = MicroBatcher([slow, fast], max_batch_size=2, max_wait_s=0)
    await batcher.start()
    first = batcher.submit_many([np.ones(3), np.ones(3)])  # to the slow copy
    await asyncio.sleep(0.05)
    second = batcher.submit_many([np.full(3, 2.0), np.full(3, 2.0)])  # to the fast copy
    with anyio.fail_after(10):
        assert await asyncio.gather(*second) == [6.0, 6.0]  # answered while the first runs
        slow_gate.set()
        assert await asyncio.gather(*first) == [3.0, 3.0]
    await batcher.stop()


async def test_a_flood_of_low_priority_items_delays_a_high_priority_one_by_one_batch_at_most() -> (
    None
):
    model = GatedDoubler()
    batcher = await started(model, max_batch_size=4, overlap=False)
    first = await hold_worker(model, batcher)
    flood = batcher.submit_many(list(range(100, 140)), level=2)  # the lowest level
    middle = batcher.submit_many([50, 51], level=1)
    urgent = batcher.submit_many([7], level=0)
    later_flood = batcher.submit_many([200], level=2)
    model.gate.set()
    assert await urgent[0] == 14 and await first == -2
    # The batch after the one running: the urgent item first, then the middle level's, then
    # the flood's oldest; the flood behind them in arrival order, the late one last.
    assert model.batches[1] == [7, 50, 51, 100]
    await asyncio.gather(*flood, *middle, *later_flood)
    flat = [item for batch in model.batches[2:] for item in batch]
    assert flat == [*range(101, 140), 200]
    await batcher.stop()


async def test_levels_keep_their_order_when_a_bucketed_batch_skips_entries() -> None:
    model = GatedDoubler()
    batcher = await started(model, max_batch_size=8, bucket_of=lambda item: item % 2)
    first = await hold_worker(model, batcher)
    low = batcher.submit_many([11, 12, 13], level=1)
    high = batcher.submit_many([2, 3, 4], level=0)
    model.gate.set()
    await asyncio.gather(first, *low, *high)
    # The highest level's oldest (2) decides the bucket: evens of every level, highest first.
    assert model.batches[1:] == [[2, 4, 12], [3, 11, 13]]
    await batcher.stop()


async def test_a_higher_level_takes_back_the_lower_batch_staged_behind_the_running_one() -> None:
    model = GatedDoubler()
    batcher = await started(model, max_batch_size=2, overlap=True)
    first = await hold_worker(model, batcher)
    low = batcher.submit_many([100, 101, 102], level=1)
    await wait_until(lambda: batcher.queue_depth == 1)  # [100, 101] staged behind the first
    urgent = batcher.submit_many([7], level=0)
    model.gate.set()
    await asyncio.gather(first, *low, *urgent)
    assert model.batches[1:] == [[7, 100], [101, 102]]
    await batcher.stop()


async def test_each_priority_level_has_the_queue_bound_to_itself() -> None:
    model = GatedDoubler()
    batcher = await started(model, max_batch_size=1, max_queue_size=3, overlap=False)
    first = await hold_worker(model, batcher)
    low = batcher.submit_many([10, 11, 12], level=1)  # level 1 full
    with pytest.raises(Overloaded, match=r"\(3 of 3 waiting at priority 2\)"):
        batcher.submit_many([13], level=1)
    high = batcher.submit_many([1, 2, 3], level=0)  # a level of its own: room for 3
    with pytest.raises(Overloaded, match=r"\(3 of 3 waiting at priority 1\)"):
        batcher.submit_many([4], level=0)
    model.gate.set()
    assert await asyncio.gather(first, *high, *low) == [-2, 2, 4, 6, 20, 22, 24]
    await batcher.stop()
