"""MicroBatcher: gathers concurrent requests into batches and runs each in one worker thread.

Generic on purpose: it knows nothing of torch or HTTP. It takes a `process` callable that maps a
list of items to a list of results of the same length, and runs it in a dedicated thread.

How a batch forms:
- When the worker is idle, whatever is waiting is dispatched at once (up to `max_batch_size`):
  a lone request never waits for a timer.
- While the worker runs a batch, arrivals accumulate. The next batch is handed to the worker's
  queue when it reaches `max_batch_size`, when its oldest item has waited `max_wait_s`, or when
  the worker becomes idle, whichever comes first. Handing it over early lets the worker start it
  the moment the current batch ends, without a round trip through a busy event loop.
- At most one batch waits behind the running one; later arrivals form the batch after that.

Every future is resolved: with its own result, with the batch's exception, or with
`BatcherClosed` when the batcher stops or its collector crashes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future as ConcurrentFuture
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from gpuserve.errors import BatcherClosed

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger("gpuserve.batcher")

# One batch runs while the next one waits, ready, in the worker's queue.
_MAX_BATCHES_IN_FLIGHT = 2


@dataclass(frozen=True, slots=True)
class BatchStats:
    """What one batch cost, reported to the `on_batch` callback."""

    size: int
    queue_wait_s: float
    forward_s: float
    failed: bool


@dataclass(slots=True)
class _Entry(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    enqueued: float


class MicroBatcher(Generic[T, R]):
    """Batches `submit()`ed items through `process` in one worker thread."""

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        name: str = "batcher",
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        self._process = process
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.name = name
        self._on_batch = on_batch
        self._pending: collections.deque[_Entry[T, R]] = collections.deque()
        self._in_flight: list[list[_Entry[T, R]]] = []
        self._wake = asyncio.Event()
        self._collector: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._error: str | None = None

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (not counting those in flight)."""
        return len(self._pending)

    @property
    def running(self) -> bool:
        """True while the batcher accepts work."""
        return self._collector is not None and not self._closing and self._error is None

    @property
    def error(self) -> str | None:
        """Why the collector crashed, if it did."""
        return self._error

    async def start(self) -> None:
        """Start the collector task and the worker thread. Call from the event loop."""
        if self._collector is not None:
            raise RuntimeError("batcher already started")
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-fwd")
        self._collector = asyncio.create_task(self._collect(), name=f"{self.name}-collector")

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue one item; the returned future resolves to its result.

        Raises BatcherClosed at once when the batcher is not running. Cancelling the future
        (a client that went away) drops the item if its batch has not formed yet.
        """
        if not self.running or self._loop is None:
            raise BatcherClosed(self._closed_reason())
        future: asyncio.Future[R] = self._loop.create_future()
        self._pending.append(_Entry(item, future, time.monotonic()))
        self._wake.set()
        return future

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
            self._fail_all(BatcherClosed("the server stopped before this request was answered"))
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)

    async def _collect(self) -> None:
        try:
            while True:
                self._drop_abandoned_head()
                if not self._pending:
                    if self._closing and not self._in_flight:
                        return
                    await self._sleep()
                elif len(self._in_flight) >= _MAX_BATCHES_IN_FLIGHT:
                    await self._sleep()
                elif self._in_flight and not self._closing and self._should_grow():
                    await self._sleep(self._pending[0].enqueued + self.max_wait_s)
                else:
                    self._dispatch()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._error = f"batch collector crashed: {type(exc).__name__}: {exc}"
            logger.exception("%s: %s", self.name, self._error)
            # Batches already in the worker still resolve through _finish; the rest fail now.
            self._fail_all(BatcherClosed(self._error), in_flight=False)

    def _should_grow(self) -> bool:
        """While the worker is busy, keep a small batch open until it is full or old enough."""
        if len(self._pending) >= self.max_batch_size:
            return False
        return time.monotonic() < self._pending[0].enqueued + self.max_wait_s

    async def _sleep(self, until: float | None = None) -> None:
        """Wait for a submit, a finished batch, or the deadline. No polling."""
        self._wake.clear()
        if until is None:
            await self._wake.wait()
            return
        try:
            async with asyncio.timeout(max(0.0, until - time.monotonic())):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _drop_abandoned_head(self) -> None:
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()

    def _dispatch(self) -> None:
        batch: list[_Entry[T, R]] = []
        while self._pending and len(batch) < self.max_batch_size:
            entry = self._pending.popleft()
            if not entry.future.done():  # its client gave up while it was queued
                batch.append(entry)
        if not batch:
            return
        assert self._loop is not None and self._executor is not None
        self._in_flight.append(batch)
        items = [entry.item for entry in batch]
        work = self._executor.submit(self._run, items)
        work.add_done_callback(functools.partial(self._finish_threadsafe, self._loop, batch))

    def _run(self, items: list[T]) -> tuple[Sequence[R], float, float]:
        """Runs in the worker thread."""
        started = time.monotonic()
        results = self._process(items)
        return results, started, time.monotonic() - started

    def _finish_threadsafe(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Entry[T, R]],
        done: ConcurrentFuture[tuple[Sequence[R], float, float]],
    ) -> None:
        """Runs in the worker thread: hand the finished batch back to the event loop."""
        # A closed loop means stop() has already failed these futures.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._finish, batch, done)

    def _finish(
        self, batch: list[_Entry[T, R]], done: ConcurrentFuture[tuple[Sequence[R], float, float]]
    ) -> None:
        """Runs in the event loop when a batch's work is done."""
        if batch in self._in_flight:
            self._in_flight.remove(batch)
        self._wake.set()
        failed = True
        started = batch[0].enqueued
        forward_s = 0.0
        try:
            results, started, forward_s = done.result()
            if len(results) != len(batch):
                raise RuntimeError(
                    f"process returned {len(results)} results for a batch of {len(batch)}"
                )
        except BaseException as exc:
            logger.error("%s: batch of %d failed", self.name, len(batch), exc_info=exc)
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(exc)
        else:
            failed = False
            for entry, result in zip(batch, results, strict=True):
                if not entry.future.done():
                    entry.future.set_result(result)
        self._report(batch, started, forward_s, failed)

    def _report(
        self, batch: list[_Entry[T, R]], started: float, forward_s: float, failed: bool
    ) -> None:
        if self._on_batch is None:
            return
        stats = BatchStats(
            size=len(batch),
            queue_wait_s=max(0.0, started - batch[0].enqueued),
            forward_s=forward_s,
            failed=failed,
        )
        try:
            self._on_batch(stats)
        except Exception:  # metrics must never break serving
            logger.exception("%s: on_batch callback failed", self.name)

    def _fail_all(self, exc: BaseException, *, in_flight: bool = True) -> None:
        entries = list(self._pending)
        self._pending.clear()
        if in_flight:
            entries += [entry for batch in self._in_flight for entry in batch]
            self._in_flight.clear()
        for entry in entries:
            if not entry.future.done():
                entry.future.set_exception(exc)

    def _closed_reason(self) -> str:
        if self._error is not None:
            return f"model unavailable: {self._error}"
        if self._closing:
            return "the server is shutting down"
        return "the model is not ready"
