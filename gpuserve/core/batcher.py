"""MicroBatcher: gathers concurrent requests into batches and runs each in one worker thread.

Generic on purpose: it knows nothing of torch or HTTP. It takes a `process` callable that maps a
list of items to a list of results of the same length, and runs it in a dedicated thread; or
several such callables (copies of a model, on one device or several), each with its own thread,
and each batch goes to the least loaded one.

How a batch forms:
- When a worker is idle, whatever is waiting is dispatched at once (up to `max_batch_size`):
  a lone request never waits for a timer. Unless callers are due back: when fewer wait than
  the last finished batch left in hand, the batch stays open for them, one pass or as long
  as they take to come back at their recent pace, never past `max_wait_s` (the rules live in
  `batch_policy`).
- While every worker runs a batch, arrivals accumulate. The next batch is handed to the worker's
  queue when it reaches `max_batch_size`, when its oldest item has waited `max_wait_s`, or when
  the worker becomes idle, whichever comes first. Handing it over early lets the worker start it
  the moment the current batch ends, without a round trip through a busy event loop.
  Unless the passes and the event loop share their cores (`overlap=False`: a model on the CPU
  whose threads fill the cores): then nothing overlaps anyway, and a batch behind a busy worker
  grows until a worker is free or it is full, since its items wait for that worker either way.
- At most one batch waits behind the running one of each worker; later arrivals form the batch
  after that. A worker that has `prepare` and `run` stages (the model handler does) gets the
  waiting batch's `prepare` started at once in a second thread, so its collate and copy to the
  device overlap the running forward pass.
- With `bucket_of`, a batch only holds items of the oldest waiting item's bucket (for example
  sequences of similar length); the others keep their place in the queue.
- A worker that is `pipelined` (a model on a GPU) splits its run into `launch` and
  `complete`: its thread launches a batch and goes on to the next, and a completion thread
  waits for each launched batch's output and resolves it. The device is fed while earlier
  batches finish; up to three of a worker's batches are in flight (two launched, one
  waiting to launch).

When things go wrong:
- The queue is bounded (`max_queue_size`): a submit past it raises `Overloaded` at once.
- A batch that raises is retried in halves, down to single items, so only the item that fails
  gets the error and its neighbours get their results.
- An error that `is_oom` recognises also caps the batch size at half the failed size for
  `oom_cooldown_s`.
- A forward pass that runs past `forward_timeout_s` takes its worker out of service until it
  returns: its own batch fails with `BatcherClosed` (503), and the batch staged behind it goes
  back to the queue for the other workers. When no worker is left, the batcher stalls:
  everything waiting fails with `BatcherClosed` and `error` says why, until a pass returns.

Every future is resolved: with its own result, with its own error, or with `BatcherClosed`
when the batcher stops, stalls or its collector crashes.

The batcher carries these out; the parts live beside it: `batch_policy` (when a batch goes),
`worker_threads` (the threads and a worker's stages), `isolation` (retries in halves).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import operator
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import Future as ConcurrentFuture
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gpuserve.core.batch_policy import FormationPolicy
from gpuserve.core.deadlines import Deadlines
from gpuserve.core.errors import BatcherClosed, InferenceError, Overloaded
from gpuserve.core.isolation import (
    Outcome,
    deliverable,
    is_memory_error,
    never_fatal,
    run_isolating,
)
from gpuserve.core.worker_threads import WorkerThread, pipeline, resolve, settle_with, stages

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger("gpuserve.core.batcher")

# One batch runs while the next one waits, ready, in the worker's queue.
_MAX_BATCHES_IN_FLIGHT = 2
# A pipelined worker: two launched (one computing, one queued on the device) and one waiting.
_MAX_PIPELINED_IN_FLIGHT = 3


_ENQUEUED = operator.attrgetter("enqueued")


@dataclass(frozen=True, slots=True)
class BatchStats:
    """What one batch cost, reported to the `on_batch` callback."""

    size: int
    queue_wait_s: float  # the oldest item's
    forward_s: float
    failed_items: int
    oom_splits: int
    worker: int = 0
    queue_wait_total_s: float = 0.0  # every item's, added up
    started: float = 0.0  # when the pass began, time.monotonic()


@dataclass(slots=True)
class Trace:
    """What one request's items went through, filled in as their batches finish (for logs).

    With several items, the largest batch, the longest queue wait and the longest pass count.
    """

    batches: int = 0
    batch_size: int = 0
    queue_wait_s: float = 0.0
    forward_s: float = 0.0
    request_id: str = ""  # for log lines written away from the request (in an engine)
    started: float = 0.0  # when its (last) batch's pass began, time.monotonic()
    links: tuple[Any, ...] = ()  # what `on_batch` returned for its batches (their spans)


# eq=False: entries and batches are compared by identity. Field-wise equality would compare
# the items, and numpy arrays refuse to be truth-tested (`batch in in_flight` raised).
@dataclass(slots=True, eq=False)
class _Entry(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    enqueued: float
    bucket: Hashable = None
    trace: Trace | None = None
    level: int = 0  # its priority: 0 the highest; the queue is in level order, then arrival


@dataclass(slots=True, eq=False)
class _Batch(Generic[T, R]):
    entries: list[_Entry[T, R]]
    worker: int = 0
    prepared: ConcurrentFuture[Any] | None = None  # the first stage, started early
    work: ConcurrentFuture[Any] | None = None  # in the worker's executor
    requeued: bool = False  # taken back from a stuck worker before it started
    started: float | None = None  # set by the worker thread when the forward pass begins
    watchdog: int | None = None  # its key in the batcher's watchdogs


class MicroBatcher(Generic[T, R]):
    """Batches `submit()`ed items through `process` in one worker thread."""

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R]] | Sequence[Callable[[list[T]], Sequence[R]]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        hold_for_callers: bool = True,
        overlap: bool = True,
        max_queue_size: int | None = None,
        forward_timeout_s: float | None = None,
        oom_cooldown_s: float = 30.0,
        is_oom: Callable[[BaseException], bool] = is_memory_error,
        is_fatal: Callable[[BaseException], bool] = never_fatal,
        name: str = "batcher",
        on_batch: Callable[[BatchStats], object] | None = None,
        bucket_of: Callable[[T], Hashable] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        if max_queue_size is not None and max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")
        self._workers = [process] if callable(process) else list(process)
        if not self._workers:
            raise ValueError("at least one process function is needed")
        # Each worker's (prepare, run) stages, found once rather than on every batch; and its
        # (prepare, launch, complete) stages where it is pipelined.
        self._stages = [stages(worker) for worker in self._workers]
        self._pipelines = [pipeline(worker) for worker in self._workers]
        self._depth = [
            _MAX_BATCHES_IN_FLIGHT if three is None else _MAX_PIPELINED_IN_FLIGHT
            for three in self._pipelines
        ]
        self._policy = FormationPolicy(
            max_batch_size, max_wait_s, hold_for_callers, overlap, oom_cooldown_s
        )
        self.max_queue_size = max_queue_size
        self.forward_timeout_s = forward_timeout_s
        self._is_oom = is_oom
        self._is_fatal = is_fatal
        self.name = name
        self._on_batch = on_batch
        self._bucket_of = bucket_of
        self._pending: collections.deque[_Entry[T, R]] = collections.deque()
        self._in_flight: list[_Batch[T, R]] = []
        # Each batch's forward_timeout_s, on one timer for all: a timer per batch cost 2-3 µs
        # to arm and cancel, paid by every request at c=1.
        self._watchdogs = Deadlines()
        self._wake = asyncio.Event()
        self._collector: asyncio.Task[None] | None = None
        self._executors: list[WorkerThread] = []
        self._preparers: list[WorkerThread | None] = []
        self._completers: list[WorkerThread | None] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._crashed: str | None = None
        self._stalled: str | None = None
        self._stuck: dict[int, _Batch[T, R]] = {}  # worker -> the pass it is stuck in
        self._dead: dict[int, str] = {}  # worker -> the fatal error that ended it
        # Futures given up on (deadline, hang-up) since the queue was last swept; a hint only.
        self._abandoned = 0

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch and still wanted (not counting those in flight)."""
        return sum(not entry.future.done() for entry in self._pending)

    @property
    def max_batch_size(self) -> int:
        """The largest batch (the service lowers it to a size it measured as best)."""
        return self._policy.max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, size: int) -> None:
        self._policy.max_batch_size = size

    @property
    def max_wait_s(self) -> float:
        return self._policy.max_wait_s

    @property
    def hold_for_callers(self) -> bool:
        return self._policy.hold_for_callers

    @property
    def overlap(self) -> bool:
        """Whether a batch behind a busy worker is handed over early (see the policy)."""
        return self._policy.overlap

    @property
    def batch_cap(self) -> int:
        """The largest batch dispatched now: below max_batch_size after an out-of-memory error."""
        return self._policy.batch_cap

    @property
    def running(self) -> bool:
        """True while the batcher accepts work."""
        return self._collector is not None and not self._closing and self.error is None

    @property
    def lost(self) -> bool:
        """Every worker met a fatal error (a sticky CUDA error, say): only a new process can
        serve this model again."""
        return bool(self._dead) and len(self._dead) == len(self._workers)

    @property
    def error(self) -> str | None:
        """Why the batcher cannot serve: its collector crashed, a forward pass is stuck, or
        every worker met a fatal error."""
        if self._dead and len(self._dead) == len(self._workers):
            return next(iter(self._dead.values()))
        return self._crashed or self._stalled

    async def start(self) -> None:
        """Start the collector task and the worker thread. Call from the event loop."""
        if self._collector is not None:
            raise RuntimeError("batcher already started")
        self._loop = asyncio.get_running_loop()
        self._executors = [
            WorkerThread(f"{self.name}-fwd{index}") for index in range(len(self._workers))
        ]
        self._preparers = [
            WorkerThread(f"{self.name}-prep{index}") if two is not None else None
            for index, two in enumerate(self._stages)
        ]
        self._completers = [
            WorkerThread(f"{self.name}-done{index}") if three is not None else None
            for index, three in enumerate(self._pipelines)
        ]
        self._collector = asyncio.create_task(self._collect(), name=f"{self.name}-collector")

    async def on_each_worker(self, fn: Callable[[Any], Any]) -> list[Any]:
        """`fn(worker)` for each worker, in that worker's own thread, one after another.

        For work that must happen in the thread that will serve (a compiled model's warm-up),
        before any batch is dispatched. One at a time, so timings taken there do not overlap.
        """
        results = []
        for executor, worker in zip(self._executors, self._workers, strict=True):
            results.append(await asyncio.wrap_future(executor.submit(fn, worker)))
        return results

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue one item; the returned future resolves to its result.

        Raises BatcherClosed when the batcher is not running and Overloaded when its queue is
        full, both at once. Cancelling the future (a client that went away, a deadline) drops
        the item if its batch has not formed yet.
        """
        return self.submit_many([item])[0]

    def submit_many(
        self, items: Sequence[T], trace: Trace | None = None, level: int = 0
    ) -> list[asyncio.Future[R]]:
        """Queue several items, all or none: a request is never half admitted.

        `trace`, if given, is filled in as the items' batches finish. `level` is their
        priority (0 the highest): they queue behind every item of their level or a higher
        one and ahead of every lower one, so batches take the highest levels first.
        """
        if not self.running or self._loop is None:
            raise BatcherClosed(self._closed_reason())
        limit = self.max_queue_size
        if limit is not None and len(self._pending) + len(items) > limit:
            # Only live requests count: entries whose requests expired or hung up still sit
            # in the queue until a batch forms. Sweep them out, but only when some were given
            # up on, so a flood of refusals does not scan a full queue each time.
            if self._abandoned:
                self._sweep()
            # Each priority level has the bound to itself: its entries are counted only when
            # the whole queue is past the bound and holds other levels too.
            pending = self._pending
            waiting = len(pending)
            if waiting + len(items) > limit and not (
                not pending or pending[0].level == pending[-1].level == level
            ):
                waiting = sum(1 for entry in pending if entry.level == level)
            if waiting + len(items) > limit:
                alone = level == 0 and waiting == len(pending)  # no levels in use, likely
                where = "" if alone else f" at priority {level + 1}"
                raise Overloaded(
                    f"the queue is full ({waiting} of {limit} waiting{where}); retry shortly"
                )
        now = time.monotonic()
        bucket_of = self._bucket_of
        pending = self._pending
        # Behind the queue's tail, the common case (one level, or the lowest); else ahead of
        # the lower levels' entries, found from the tail.
        at = None if not pending or pending[-1].level <= level else self._place(level)
        if at is not None and self._in_flight:
            self._make_way(level)
            at = self._place(level)
        futures = []
        for item in items:
            future: asyncio.Future[R] = self._loop.create_future()
            bucket = bucket_of(item) if bucket_of is not None else None
            entry = _Entry(item, future, now, bucket, trace, level)
            if at is None:
                pending.append(entry)
            else:
                pending.insert(at, entry)
                at += 1
            futures.append(future)
        self._policy.arrived()
        self._wake.set()
        return futures

    def _make_way(self, level: int) -> None:
        """Take back the batches handed to a worker but not started that hold only lower
        levels than `level`, so that an item of `level` waits for the pass under way at
        most, not also for the batch staged behind it. (Not from a pipelined worker: its
        batch may be launching, with no way to take it back.)"""
        for staged in list(self._in_flight):
            if (
                staged.started is None
                and self._pipelines[staged.worker] is None
                and all(entry.level > level for entry in staged.entries)
            ):
                self._take_back(staged)

    def _take_back(self, staged: _Batch[T, R]) -> None:
        """Hand a batch given to a worker back to the queue, unless it has started: each
        entry at the head of its level, so that it keeps its turn and the queue its order."""
        if staged.work is None or not staged.work.cancel():
            return
        staged.requeued = True
        self._in_flight.remove(staged)
        if staged.watchdog is not None:
            self._watchdogs.discard(staged.watchdog)
        for entry in reversed(staged.entries):
            self._pending.insert(self._place(entry.level, first=True), entry)

    def _place(self, level: int, first: bool = False) -> int:
        """Where an entry of `level` goes: behind the last entry of its level or higher, or
        with `first` ahead of its level's others (an entry taken back keeps its turn)."""
        pending = self._pending
        at = len(pending)
        while at and (pending[at - 1].level >= level if first else pending[at - 1].level > level):
            at -= 1
        return at

    def release(self, futures: Iterable[asyncio.Future[R]]) -> None:
        """The caller no longer wants these results: cancel what is not done.

        Their items are dropped when batches form, and no longer count against the queue.
        """
        for future in futures:
            if not future.done():
                future.cancel()
            if future.cancelled():
                self._abandoned += 1

    def fail(self, futures: Iterable[asyncio.Future[R]], error: type[BaseException]) -> None:
        """Fail what is not done of these futures with `error` (a request's deadline passed).

        As with `release`, their items are dropped when batches form, and no longer count
        against the queue.
        """
        for future in futures:
            if not future.done():
                future.set_exception(error)
                self._abandoned += 1

    def _sweep(self) -> None:
        self._pending = collections.deque(e for e in self._pending if not e.future.done())
        self._abandoned = 0

    def abort(self, reason: str) -> None:
        """Refuse new work and answer everything waiting or running with BatcherClosed now.

        For a second stop signal: the process is about to go, and every accepted request
        still gets its answer (503) first. A forward pass under way runs on, for nobody.
        """
        self._closing = True
        self._fail_waiting(BatcherClosed(reason))
        # Nothing is left to wait for: stop() need not wait for passes that answer nobody.
        self._watchdogs.close()
        self._in_flight.clear()
        self._wake.set()

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop accepting work, finish what was accepted, then stop the worker.

        What is still unanswered after `timeout_s` fails with BatcherClosed.
        """
        if self._collector is None:
            return
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._collector), timeout_s)
        except TimeoutError:
            if self._pending or self._in_flight:  # a stop with nothing accepted is no drain
                logger.warning(
                    "%s: drain took longer than %.1fs; failing the rest", self.name, timeout_s
                )
            self._collector.cancel()
            await asyncio.gather(self._collector, return_exceptions=True)
            self._fail_waiting(BatcherClosed("the server stopped before this request was answered"))
        finally:
            self._watchdogs.close()
            for executor in [*self._executors, *self._preparers, *self._completers]:
                if executor is not None:
                    executor.shutdown()

    async def _collect(self) -> None:
        try:
            while True:
                self._drop_abandoned_head()
                if not self._pending:
                    if self._closing and not self._in_flight:
                        return
                    await self._sleep()
                elif self._free_worker() is None or self._stalled:
                    await self._sleep()
                elif (until := self._open_until()) is not None:
                    await self._sleep(None if until == math.inf else until)
                else:
                    self._dispatch()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._crashed = f"batch collector crashed: {type(exc).__name__}: {exc}"
            logger.exception("%s: %s", self.name, self._crashed)
            # Batches already in the worker still resolve through _finish; the rest fail now.
            self._fail_waiting(BatcherClosed(self._crashed), in_flight=False)

    @property
    def workers(self) -> int:
        """How many process functions (model copies) batches are spread over."""
        return len(self._workers)

    def _loads(self) -> list[int]:
        loads = [0] * len(self._workers)
        for batch in self._in_flight:
            loads[batch.worker] += 1
        return loads

    def _serving(self) -> list[int]:
        """The workers in service: neither stuck in a pass nor ended by a fatal error."""
        return [
            i for i in range(len(self._workers)) if i not in self._stuck and i not in self._dead
        ]

    def _free_worker(self) -> int | None:
        """The least loaded worker in service that can take a batch now, or None."""
        loads = self._loads()
        serving = self._serving()
        if not serving:
            return None
        least = min(serving, key=loads.__getitem__)
        return least if loads[least] < self._depth[least] else None

    def _all_busy(self) -> bool:
        loads = self._loads()
        return all(loads[index] for index in self._serving())

    def _open_until(self) -> float | None:
        """Until when the waiting batch may keep growing, or None to dispatch it now
        (`FormationPolicy.open_until`); at once when the batcher is closing."""
        if self._closing:
            return None
        return self._policy.open_until(
            len(self._pending), self._pending[0].enqueued, self._all_busy, self._items_in_flight
        )

    def _items_in_flight(self) -> int:
        return sum(len(batch.entries) for batch in self._in_flight)

    async def _sleep(self, until: float | None = None) -> None:
        """Wait for a submit, a finished batch, or the deadline. No polling."""
        self._wake.clear()
        if until is None:
            await self._wake.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, until - time.monotonic())):
                await self._wake.wait()

    def _drop_abandoned_head(self) -> None:
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()

    def _dispatch(self) -> None:
        self._policy.dispatched(len(self._pending))
        entries = self._take_batch(self._policy.batch_cap)
        if not entries:
            return
        worker = self._free_worker()
        assert self._loop is not None and worker is not None
        batch: _Batch[T, R] = _Batch(entries, worker)
        stages, preparer = self._stages[worker], self._preparers[worker]
        if stages is not None and preparer is not None and self._loads()[worker]:
            # The worker is busy: prepare this batch now, while the running one computes.
            batch.prepared = preparer.submit(stages[0], [entry.item for entry in entries])
        self._in_flight.append(batch)
        if self._pipelines[worker] is None:
            work = batch.work = self._executors[worker].submit(self._run, batch)
        else:
            # Resolved by the completion thread once the launched batch's output is in.
            work = batch.work = ConcurrentFuture()
            launching = self._executors[worker].submit(self._launch, batch, work)
            launching.add_done_callback(functools.partial(settle_with, work))
        work.add_done_callback(functools.partial(self._finish_threadsafe, self._loop, batch))
        if self.forward_timeout_s is not None:
            batch.watchdog = self._watch(batch, self.forward_timeout_s)

    def _take_batch(self, cap: int) -> list[_Entry[T, R]]:
        """Up to `cap` live entries, oldest first, all of the oldest entry's bucket."""
        entries: list[_Entry[T, R]] = []
        if self._bucket_of is None:
            while self._pending and len(entries) < cap:
                entry = self._pending.popleft()
                if not entry.future.done():  # its client gave up while it was queued
                    entries.append(entry)
            return entries
        self._drop_abandoned_head()
        if not self._pending:
            return entries
        bucket = self._pending[0].bucket
        others: collections.deque[_Entry[T, R]] = collections.deque()
        while self._pending and len(entries) < cap:
            entry = self._pending.popleft()
            if entry.future.done():
                continue
            if entry.bucket == bucket:
                entries.append(entry)
            else:
                others.append(entry)
        # Skipped entries keep their place at the head; no copy of the queue when there are none.
        self._pending.extendleft(reversed(others))
        return entries

    def _run(self, batch: _Batch[T, R]) -> Outcome[R]:
        """Runs in the worker thread."""
        batch.started = time.monotonic()
        # A batch handed over early may have lost members since (deadline, hang-up): skip them.
        # Reading done() across threads is a benign race: at worst one item runs for nobody.
        outcome: Outcome[R] = Outcome()
        outcome.ran = [i for i, entry in enumerate(batch.entries) if not entry.future.done()]
        process = self._workers[batch.worker]
        items = [batch.entries[i].item for i in outcome.ran]
        stages, prepared = self._stages[batch.worker], batch.prepared
        if stages is not None and prepared is not None and len(items) == len(batch.entries):
            # The first attempt runs the prepared batch; retries in halves prepare their own.
            run = stages[1]
            self._process_isolating(items, outcome, process, lambda: run(prepared.result()))
        elif items:
            self._process_isolating(items, outcome, process)
        outcome.forward_s = time.monotonic() - batch.started
        return outcome

    def _launch(self, batch: _Batch[T, R], work: ConcurrentFuture[Outcome[R]]) -> None:
        """Runs in a pipelined worker's thread: launch the batch and hand its completion to
        the completion thread, without waiting for its output."""
        # Running from here until its output is in, as an executor's future would be: a batch
        # still waiting to launch can be taken back (cancelled), a launched one cannot.
        if not work.set_running_or_notify_cancel():
            return
        batch.started = time.monotonic()
        outcome: Outcome[R] = Outcome()
        outcome.ran = [i for i, entry in enumerate(batch.entries) if not entry.future.done()]
        items = [batch.entries[i].item for i in outcome.ran]
        pipeline = self._pipelines[batch.worker]
        completer = self._completers[batch.worker]
        assert pipeline is not None and completer is not None
        prepare, launch, complete = pipeline
        process = self._workers[batch.worker]
        if not items:
            outcome.forward_s = time.monotonic() - batch.started
            resolve(work, outcome)
            return
        prepared = batch.prepared
        try:
            if prepared is not None and len(items) == len(batch.entries):
                launched = launch(prepared.result())
            else:
                launched = launch(prepare(items))
        except BaseException as exc:
            # The launch failed: the synchronous path, its retries in halves, right here.
            failure = exc

            def fail() -> Sequence[R]:
                raise failure

            self._process_isolating(items, outcome, process, fail)
            del failure
            outcome.forward_s = time.monotonic() - batch.started
            resolve(work, outcome)
            return
        completing = completer.submit(
            self._complete, batch, work, outcome, items, launched, complete
        )
        completing.add_done_callback(functools.partial(settle_with, work))

    def _complete(
        self,
        batch: _Batch[T, R],
        work: ConcurrentFuture[Outcome[R]],
        outcome: Outcome[R],
        items: list[T],
        launched: Any,
        complete: Callable[[Any], Sequence[R]],
    ) -> None:
        """Runs in the completion thread: wait for a launched batch's output, resolve it."""
        process = self._workers[batch.worker]
        self._process_isolating(items, outcome, process, lambda: complete(launched))
        outcome.forward_s = time.monotonic() - (batch.started or time.monotonic())
        resolve(work, outcome)

    def _process_isolating(
        self,
        items: list[T],
        outcome: Outcome[R],
        process: Callable[[list[T]], Sequence[R]],
        attempt: Callable[[], Sequence[R]] | None = None,
    ) -> None:
        """`run_isolating` with this batcher's tests of out-of-memory and fatal errors."""
        run_isolating(
            items,
            outcome,
            process,
            attempt,
            is_oom=self._is_oom,
            is_fatal=self._is_fatal,
            name=self.name,
        )

    def _finish_threadsafe(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: _Batch[T, R],
        done: ConcurrentFuture[Outcome[R]],
    ) -> None:
        """Runs in the worker thread: hand the finished batch back to the event loop."""
        # A closed loop means stop() has already failed these futures.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._finish, batch, done)

    def _finish(self, batch: _Batch[T, R], done: ConcurrentFuture[Outcome[R]]) -> None:
        """Runs in the event loop when a batch's work is done. Whatever goes wrong in the
        bookkeeping, the batch's requests are answered and the collector wakes."""
        try:
            self._settle(batch, done)
        except BaseException:
            logger.exception("%s: finishing a batch failed", self.name)
            if not batch.requeued:
                _fail_unanswered(batch.entries, InferenceError("inference failed"))
            with contextlib.suppress(ValueError):
                self._in_flight.remove(batch)
            self._wake.set()

    def _settle(self, batch: _Batch[T, R], done: ConcurrentFuture[Outcome[R]]) -> None:
        if batch.requeued:  # its entries went back to the queue; they are not done
            return
        self._policy.finished(len(self._pending) + self._items_in_flight(), batch.started)
        if batch in self._in_flight:
            self._in_flight.remove(batch)
        if batch.watchdog is not None:
            self._watchdogs.discard(batch.watchdog)
        if self._stuck.get(batch.worker) is batch:
            del self._stuck[batch.worker]
            self._stalled = None
            logger.warning(
                "%s: the stuck forward pass of worker %d returned; it serves again",
                self.name,
                batch.worker,
            )
        self._wake.set()
        try:
            outcome = done.result()
            if len(outcome.ran) != len(outcome.results):
                raise RuntimeError(
                    f"{len(outcome.results)} results for the {len(outcome.ran)} items run"
                )
        except BaseException as exc:  # cancelled by stop(), or a bug in _run itself
            everyone = list(range(len(batch.entries)))
            outcome = Outcome(results=[exc] * len(everyone), ran=everyone)
        failed = 0
        started = batch.started if batch.started is not None else time.monotonic()
        traced: set[int] = set()
        try:
            for index, result in zip(outcome.ran, outcome.results, strict=True):
                entry = batch.entries[index]
                failed += isinstance(result, BaseException)
                if entry.trace is not None:
                    waited = started - entry.enqueued
                    _record(entry.trace, traced, len(outcome.ran), waited, started, outcome)
                if entry.future.done():
                    continue
                if isinstance(result, BaseException):
                    entry.future.set_exception(deliverable(result))
                else:
                    entry.future.set_result(result)
        finally:
            # Whatever happened above, nobody in this batch is left waiting.
            _fail_unanswered(batch.entries, InferenceError("inference failed"))
        if outcome.fatal is not None:
            self._retire(batch.worker, outcome.fatal)
        if outcome.oom_splits:
            cap = self._policy.out_of_memory(len(outcome.ran))
            logger.warning(
                "%s: out of memory at batch size %d; capping batches at %d for %.0fs",
                self.name,
                len(outcome.ran),
                cap,
                self._policy.oom_cooldown_s,
            )
        note = self._report(batch, outcome, failed)
        if note is not None:
            _link(batch.entries, note)

    def _retire(self, worker: int, reason: str) -> None:
        """A worker met a fatal error: it serves no more. When none is left, the batcher
        reports the error (the model turns failed) and fails whatever waits."""
        self._dead[worker] = reason
        if self.error is not None:
            logger.critical("%s: no copy can serve: %s", self.name, reason)
            self._fail_waiting(BatcherClosed(f"model unavailable: {reason}"))
            return
        # The batch staged behind the failed one would fail too: it goes back to the queue.
        self._requeue_staged(worker)
        self._wake.set()

    def _requeue_staged(self, worker: int) -> None:
        """Hand the batches waiting on `worker`, not yet started, back to the queue."""
        for staged in [b for b in self._in_flight if b.worker == worker]:
            self._take_back(staged)

    def _watch(self, batch: _Batch[T, R], after_s: float) -> int:
        return self._watchdogs.add(after_s, functools.partial(self._check_stalled, batch))

    def _check_stalled(self, batch: _Batch[T, R]) -> None:
        """The watchdog: runs in the event loop `forward_timeout_s` after dispatch."""
        assert self.forward_timeout_s is not None and self._loop is not None
        if batch.started is None:  # still waiting behind the running batch: not its fault
            batch.watchdog = self._watch(batch, self.forward_timeout_s)
            return
        overdue = batch.started + self.forward_timeout_s - time.monotonic()
        if overdue > 0:
            batch.watchdog = self._watch(batch, overdue)
            return
        problem = f"a forward pass has run for more than {self.forward_timeout_s:g}s"
        self._stuck[batch.worker] = batch
        if len(self._stuck) == len(self._workers):
            self._stalled = problem
            logger.error("%s: %s; failing waiting requests", self.name, problem)
            self._fail_waiting(BatcherClosed(f"model unavailable: {problem}"))
            return
        # Other workers still serve: fail only the stuck batch, and hand back the one staged
        # behind it, which would otherwise wait for as long as the stuck pass lasts.
        logger.error(
            "%s: worker %d: %s; %d other worker(s) keep serving",
            self.name,
            batch.worker,
            problem,
            len(self._workers) - len(self._stuck),
        )
        failure = BatcherClosed(f"model unavailable: {problem}")
        for entry in batch.entries:
            if not entry.future.done():
                entry.future.set_exception(failure)
        self._requeue_staged(batch.worker)  # the stuck batch is running: cancel() spares it
        self._wake.set()

    def _report(self, batch: _Batch[T, R], outcome: Outcome[R], failed: int) -> object:
        """Hand the batch's stats to `on_batch`; what it returns (a span, say) is noted on
        the batch's traces."""
        if self._on_batch is None or not outcome.ran:
            return None
        started = batch.started if batch.started is not None else batch.entries[0].enqueued
        stats = BatchStats(
            size=len(outcome.ran),
            queue_wait_s=max(0.0, started - batch.entries[0].enqueued),
            forward_s=outcome.forward_s,
            failed_items=failed,
            oom_splits=outcome.oom_splits,
            worker=batch.worker,
            # In C (no Python call per item): n x start - the sum of the arrival times.
            queue_wait_total_s=max(
                0.0,
                started * len(batch.entries) - math.fsum(map(_ENQUEUED, batch.entries)),
            ),
            started=started,
        )
        try:
            return self._on_batch(stats)
        except Exception:  # metrics must never break serving
            logger.exception("%s: on_batch callback failed", self.name)
            return None

    def _fail_waiting(self, exc: Exception, *, in_flight: bool = True) -> None:
        """Fail queued futures and, with `in_flight`, those of batches in the worker too.

        A batch in the worker keeps running; when it returns, _finish finds its futures done.
        """
        entries = list(self._pending)
        self._pending.clear()
        if in_flight:
            entries += [entry for batch in self._in_flight for entry in batch.entries]
        _fail_unanswered(entries, exc)

    def _closed_reason(self) -> str:
        if self.error is not None:
            return f"model unavailable: {self.error}"
        if self._closing:
            return "the server is shutting down"
        return "the model is not ready"


def _fail_unanswered(entries: Iterable[_Entry[Any, Any]], exc: Exception) -> None:
    for entry in entries:
        if not entry.future.done():
            entry.future.set_exception(exc)


def _link(entries: list[_Entry[T, R]], note: object) -> None:
    """Note a batch's `on_batch` result on each of its requests' traces, once per request."""
    for entry in entries:
        trace = entry.trace
        if trace is not None and note not in trace.links:
            trace.links += (note,)


def _record(
    trace: Trace,
    traced: set[int],
    size: int,
    waited_s: float,
    started: float,
    outcome: Outcome[R],
) -> None:
    trace.queue_wait_s = max(trace.queue_wait_s, waited_s)
    if id(trace) in traced:  # one request's items share a batch: count the batch once
        return
    traced.add(id(trace))
    trace.started = started
    trace.batches += 1
    trace.batch_size = max(trace.batch_size, size)
    trace.forward_s = max(trace.forward_s, outcome.forward_s)
