"""MicroBatcher: gathers concurrent requests into batches and runs each in one worker thread.

Generic on purpose: it knows nothing of torch or HTTP. It takes a `process` callable that maps a
list of items to a list of results of the same length, and runs it in a dedicated thread; or
several such callables (copies of a model, on one device or several), each with its own thread,
and each batch goes to the least loaded one.

How a batch forms:
- When a worker is idle, whatever is waiting is dispatched at once (up to `max_batch_size`):
  a lone request never waits for a timer. Unless callers are due back: when fewer wait than
  the last finished batch left in hand, the batch stays open for them, no longer than that
  batch's pass took nor past `max_wait_s` (see `_open_until`).
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
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import operator
import queue
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import Future as ConcurrentFuture
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from gpuserve.core.deadlines import Deadlines
from gpuserve.core.errors import BatcherClosed, InferenceError, Overloaded

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger("gpuserve.core.batcher")

# One batch runs while the next one waits, ready, in the worker's queue.
_MAX_BATCHES_IN_FLIGHT = 2
# A pipelined worker: two launched (one computing, one queued on the device) and one waiting.
_MAX_PIPELINED_IN_FLIGHT = 3


def is_memory_error(exc: BaseException) -> bool:
    """The default OOM test; the model's handler supplies one that knows its device."""
    return isinstance(exc, MemoryError)


def never_fatal(exc: BaseException) -> bool:
    """The default test for an error that ends a worker for good: none does."""
    return False


def deliverable(exc: BaseException) -> Exception:
    """`exc` as an error a waiting request can be given.

    Whatever a model raises is its item's answer, but not everything it raises can travel
    through a future: asyncio refuses StopIteration, and a BaseException (KeyboardInterrupt,
    SystemExit, CancelledError, a user's own subclass) would escape every `except Exception`
    on its way back and tear down the request, or be mistaken for a cancellation. Those are
    wrapped in an InferenceError whose cause is the original, for the log.
    """
    if isinstance(exc, Exception) and not isinstance(exc, StopIteration | StopAsyncIteration):
        return exc
    wrapped = InferenceError("inference failed")
    wrapped.__cause__ = exc
    return wrapped


class _WorkerThread:
    """A single daemon thread that runs submitted calls in order, like a one-thread executor.

    ThreadPoolExecutor's threads are joined when the interpreter exits, so one forward pass
    that never returns would hold the process past any shutdown timeout (it did: 19.7 s
    against 2 s). A daemon thread is left behind instead; by then every request it held has
    been answered.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[
            tuple[ConcurrentFuture[Any], Callable[..., Any], tuple[Any, ...]] | None
        ] = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> ConcurrentFuture[Any]:
        future: ConcurrentFuture[Any] = ConcurrentFuture()
        self._calls.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        """Let the thread end after the call it is running; calls not yet started are dropped."""
        self._stopped = True
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            if self._stopped:
                future.cancel()
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            del call, future, fn, args  # nothing of a finished batch outlives it here


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


@dataclass(slots=True)
class Trace:
    """What one request's items went through, filled in as their batches finish (for logs).

    With several items, the largest batch, the longest queue wait and the longest pass count.
    """

    batches: int = 0
    batch_size: int = 0
    queue_wait_s: float = 0.0
    forward_s: float = 0.0


# eq=False: entries and batches are compared by identity. Field-wise equality would compare
# the items, and numpy arrays refuse to be truth-tested (`batch in in_flight` raised).
@dataclass(slots=True, eq=False)
class _Entry(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    enqueued: float
    bucket: Hashable = None
    trace: Trace | None = None


@dataclass(slots=True, eq=False)
class _Batch(Generic[T, R]):
    entries: list[_Entry[T, R]]
    worker: int = 0
    prepared: ConcurrentFuture[Any] | None = None  # the first stage, started early
    work: ConcurrentFuture[Any] | None = None  # in the worker's executor
    requeued: bool = False  # taken back from a stuck worker before it started
    started: float | None = None  # set by the worker thread when the forward pass begins
    watchdog: int | None = None  # its key in the batcher's watchdogs


@dataclass(slots=True)
class _Outcome(Generic[R]):
    """What the worker hands back: a result or an error per item, in order."""

    results: list[R | BaseException] = field(default_factory=list)
    ran: list[int] = field(default_factory=list)  # indices of the entries that were processed
    forward_s: float = 0.0
    oom_splits: int = 0
    fatal: str | None = None  # the worker can never run again (a broken device context)


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
        on_batch: Callable[[BatchStats], None] | None = None,
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
        self._stages = [_stages(worker) for worker in self._workers]
        self._pipelines = [_pipeline(worker) for worker in self._workers]
        self._depth = [
            _MAX_BATCHES_IN_FLIGHT if pipeline is None else _MAX_PIPELINED_IN_FLIGHT
            for pipeline in self._pipelines
        ]
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.hold_for_callers = hold_for_callers
        self.overlap = overlap
        self.max_queue_size = max_queue_size
        self.forward_timeout_s = forward_timeout_s
        self.oom_cooldown_s = oom_cooldown_s
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
        self._executors: list[_WorkerThread] = []
        self._preparers: list[_WorkerThread | None] = []
        self._completers: list[_WorkerThread | None] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._crashed: str | None = None
        self._stalled: str | None = None
        self._stuck: dict[int, _Batch[T, R]] = {}  # worker -> the pass it is stuck in
        self._dead: dict[int, str] = {}  # worker -> the fatal error that ended it
        self._cap = max_batch_size
        self._cap_until = 0.0
        # Futures given up on (deadline, hang-up) since the queue was last swept; a hint only.
        self._abandoned = 0
        # The items held (waiting and in flight) when the last batch finished, and until when
        # an idle worker may wait for those not back yet (see _open_until).
        self._load = 0
        self._hold_until = 0.0
        self._free_since = 0.0  # when the last batch finished, freeing its worker

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch and still wanted (not counting those in flight)."""
        return sum(not entry.future.done() for entry in self._pending)

    @property
    def batch_cap(self) -> int:
        """The largest batch dispatched now: below max_batch_size after an out-of-memory error."""
        return self._cap if time.monotonic() < self._cap_until else self.max_batch_size

    @property
    def running(self) -> bool:
        """True while the batcher accepts work."""
        return self._collector is not None and not self._closing and self.error is None

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
            _WorkerThread(f"{self.name}-fwd{index}") for index in range(len(self._workers))
        ]
        self._preparers = [
            _WorkerThread(f"{self.name}-prep{index}") if stages is not None else None
            for index, stages in enumerate(self._stages)
        ]
        self._completers = [
            _WorkerThread(f"{self.name}-done{index}") if pipeline is not None else None
            for index, pipeline in enumerate(self._pipelines)
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
        self, items: Sequence[T], trace: Trace | None = None
    ) -> list[asyncio.Future[R]]:
        """Queue several items, all or none: a request is never half admitted.

        `trace`, if given, is filled in as the items' batches finish.
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
            if len(self._pending) + len(items) > limit:
                raise Overloaded(
                    f"the queue is full ({len(self._pending)} of {limit} waiting); retry shortly"
                )
        now = time.monotonic()
        bucket_of = self._bucket_of
        futures = []
        for item in items:
            future: asyncio.Future[R] = self._loop.create_future()
            bucket = bucket_of(item) if bucket_of is not None else None
            self._pending.append(_Entry(item, future, now, bucket, trace))
            futures.append(future)
        self._wake.set()
        return futures

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
        """Until when the waiting batch may keep growing (math.inf: until something happens),
        or None to dispatch it now.

        Behind a busy worker, a batch grows until it is full or its oldest item has waited
        `max_wait_s`; without `overlap`, until it is full or a worker is free. At an idle
        worker it is dispatched at once, unless fewer items wait than the load seen when the
        last batch finished leaves room for (callers that wait for each answer before asking
        again are due back): then it stays open for them, but no longer than that batch's
        forward pass took, nor more than `max_wait_s` after the worker became free (or after
        the oldest item came, if later). A lone caller never waits, and a steady crowd of
        callers gets full batches rather than halves. With `hold_for_callers` false, an idle
        worker never holds a batch.
        """
        waiting = len(self._pending)
        if self._closing or waiting >= self.batch_cap:
            return None
        oldest = self._pending[0].enqueued
        if self._all_busy():
            if not self.overlap:
                return math.inf
            until = oldest + self.max_wait_s
        else:
            # Time spent waiting for a busy worker is not time spent waiting for the batch to
            # fill: max_wait_s counts from when the batch could have run.
            until = max(oldest, self._free_since) + self.max_wait_s
            if not self.hold_for_callers:
                return None
            if waiting >= self._load - self._items_in_flight():
                return None
            until = min(until, self._hold_until)
        return until if time.monotonic() < until else None

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
        entries = self._take_batch(self.batch_cap)
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
            launching.add_done_callback(functools.partial(_settle_with, work))
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

    def _run(self, batch: _Batch[T, R]) -> _Outcome[R]:
        """Runs in the worker thread."""
        batch.started = time.monotonic()
        # A batch handed over early may have lost members since (deadline, hang-up): skip them.
        # Reading done() across threads is a benign race: at worst one item runs for nobody.
        outcome: _Outcome[R] = _Outcome()
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

    def _launch(self, batch: _Batch[T, R], work: ConcurrentFuture[_Outcome[R]]) -> None:
        """Runs in a pipelined worker's thread: launch the batch and hand its completion to
        the completion thread, without waiting for its output."""
        # Running from here until its output is in, as an executor's future would be: a batch
        # still waiting to launch can be taken back (cancelled), a launched one cannot.
        if not work.set_running_or_notify_cancel():
            return
        batch.started = time.monotonic()
        outcome: _Outcome[R] = _Outcome()
        outcome.ran = [i for i, entry in enumerate(batch.entries) if not entry.future.done()]
        items = [batch.entries[i].item for i in outcome.ran]
        pipeline = self._pipelines[batch.worker]
        completer = self._completers[batch.worker]
        assert pipeline is not None and completer is not None
        prepare, launch, complete = pipeline
        process = self._workers[batch.worker]
        if not items:
            outcome.forward_s = time.monotonic() - batch.started
            _resolve(work, outcome)
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
            _resolve(work, outcome)
            return
        completing = completer.submit(
            self._complete, batch, work, outcome, items, launched, complete
        )
        completing.add_done_callback(functools.partial(_settle_with, work))

    def _complete(
        self,
        batch: _Batch[T, R],
        work: ConcurrentFuture[_Outcome[R]],
        outcome: _Outcome[R],
        items: list[T],
        launched: Any,
        complete: Callable[[Any], Sequence[R]],
    ) -> None:
        """Runs in the completion thread: wait for a launched batch's output, resolve it."""
        process = self._workers[batch.worker]
        self._process_isolating(items, outcome, process, lambda: complete(launched))
        outcome.forward_s = time.monotonic() - (batch.started or time.monotonic())
        _resolve(work, outcome)

    def _process_isolating(
        self,
        items: list[T],
        outcome: _Outcome[R],
        process: Callable[[list[T]], Sequence[R]],
        attempt: Callable[[], Sequence[R]] | None = None,
    ) -> None:
        """Process `items`; if that fails, retry each half, so an error lands on its own item.

        `attempt`, when given, replaces the first `process(items)` (a batch prepared early).
        Whatever the model raises is caught: this runs in a worker thread, where nothing a
        model raises can be the interpreter's own exit, and an uncaught one would leave the
        batch's bookkeeping half done.
        """
        error: BaseException | None = None
        try:
            results = attempt() if attempt is not None else process(items)
            if len(results) != len(items):
                raise RuntimeError(
                    f"process returned {len(results)} results for a batch of {len(items)}"
                )
        except BaseException as exc:
            error = exc
        else:
            outcome.results.extend(results)
            return
        if self._is_fatal(error):
            # Retrying on a broken device would fail again: the whole batch fails, and the
            # worker leaves service.
            logger.critical("%s: fatal error, this copy stops serving", self.name, exc_info=error)
            outcome.fatal = f"the model failed for good: {type(error).__name__}: {error}"
            outcome.results.extend([deliverable(error)] * len(items))
            return
        # Out of the except block, so the failed attempt's frames, and the tensors they hold,
        # can be freed before the halves run (on a GPU, the halves need that memory).
        oom = self._is_oom(error)
        if len(items) == 1:
            logger.error(
                "%s: an item failed%s", self.name, " (out of memory)" * oom, exc_info=error
            )
            outcome.results.append(deliverable(error))
            return
        outcome.oom_splits += oom
        logger.warning(
            "%s: batch of %d failed (%s: %s); retrying in halves",
            self.name,
            len(items),
            type(error).__name__,
            error,
        )
        traceback.clear_frames(error.__traceback__)
        del error
        middle = len(items) // 2
        self._process_isolating(items[:middle], outcome, process)
        if outcome.fatal is not None:  # the first half broke the device: do not go on
            outcome.results.extend(
                [deliverable(RuntimeError(outcome.fatal))] * (len(items) - middle)
            )
            return
        self._process_isolating(items[middle:], outcome, process)

    def _finish_threadsafe(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: _Batch[T, R],
        done: ConcurrentFuture[_Outcome[R]],
    ) -> None:
        """Runs in the worker thread: hand the finished batch back to the event loop."""
        # A closed loop means stop() has already failed these futures.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._finish, batch, done)

    def _finish(self, batch: _Batch[T, R], done: ConcurrentFuture[_Outcome[R]]) -> None:
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

    def _settle(self, batch: _Batch[T, R], done: ConcurrentFuture[_Outcome[R]]) -> None:
        if batch.requeued:  # its entries went back to the queue; they are not done
            return
        now = time.monotonic()
        self._load = len(self._pending) + self._items_in_flight()
        self._free_since = now
        self._hold_until = now + (now - batch.started if batch.started is not None else 0.0)
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
            outcome = _Outcome(results=[exc] * len(everyone), ran=everyone)
        failed = 0
        started = batch.started if batch.started is not None else time.monotonic()
        traced: set[int] = set()
        try:
            for index, result in zip(outcome.ran, outcome.results, strict=True):
                entry = batch.entries[index]
                failed += isinstance(result, BaseException)
                if entry.trace is not None:
                    waited = started - entry.enqueued
                    _record(entry.trace, traced, len(outcome.ran), waited, outcome)
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
            self._cap = max(1, len(outcome.ran) // 2)
            self._cap_until = time.monotonic() + self.oom_cooldown_s
            logger.warning(
                "%s: out of memory at batch size %d; capping batches at %d for %.0fs",
                self.name,
                len(outcome.ran),
                self._cap,
                self.oom_cooldown_s,
            )
        self._report(batch, outcome, failed)

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
            if staged.work is not None and staged.work.cancel():
                staged.requeued = True
                self._in_flight.remove(staged)
                if staged.watchdog is not None:
                    self._watchdogs.discard(staged.watchdog)
                self._pending.extendleft(reversed(staged.entries))

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

    def _report(self, batch: _Batch[T, R], outcome: _Outcome[R], failed: int) -> None:
        if self._on_batch is None or not outcome.ran:
            return
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
        )
        try:
            self._on_batch(stats)
        except Exception:  # metrics must never break serving
            logger.exception("%s: on_batch callback failed", self.name)

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


def _record(
    trace: Trace, traced: set[int], size: int, waited_s: float, outcome: _Outcome[R]
) -> None:
    trace.queue_wait_s = max(trace.queue_wait_s, waited_s)
    if id(trace) in traced:  # one request's items share a batch: count the batch once
        return
    traced.add(id(trace))
    trace.batches += 1
    trace.batch_size = max(trace.batch_size, size)
    trace.forward_s = max(trace.forward_s, outcome.forward_s)


def _pipeline(
    worker: Callable[..., Any],
) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]] | None:
    """A pipelined worker's (prepare, launch, complete) stages; None for any other."""
    if not getattr(worker, "pipelined", False):
        return None
    stages = tuple(getattr(worker, name, None) for name in ("prepare", "launch", "complete"))
    if not all(callable(stage) for stage in stages):
        return None
    return stages  # type: ignore[return-value]


def _resolve(work: ConcurrentFuture[Any], outcome: Any) -> None:
    """Resolve a pipelined batch's work (running since its launch began)."""
    if not work.done():
        work.set_result(outcome)


def _settle_with(work: ConcurrentFuture[Any], step: ConcurrentFuture[Any]) -> None:
    """A step of a pipelined batch ended: if it never ran (dropped at stop) or raised (a bug),
    its batch's work fails, so that nobody in it waits."""
    if work.done():
        return
    if step.cancelled():
        if not work.cancel():  # launched, then its completion was dropped
            work.set_exception(BatcherClosed("the batcher stopped"))
    elif (error := step.exception()) is not None:
        if work.running():
            work.set_exception(error)
        else:
            work.cancel()


def _stages(worker: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """A worker's (prepare, run) stages, when it has both."""
    prepare, run = getattr(worker, "prepare", None), getattr(worker, "run", None)
    return (prepare, run) if callable(prepare) and callable(run) else None
