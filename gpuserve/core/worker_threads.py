"""The threads a batcher's workers run in, and the stages a worker may have.

A worker is a batch function; one with `prepare` and `run` has two stages (the next batch is
prepared while the running one computes); a `pipelined` one also has `launch` and `complete`
(its thread launches batches, a completion thread waits for their outputs).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future as ConcurrentFuture
from typing import Any

from gpuserve.core.errors import BatcherClosed


class WorkerThread:
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


def stages(worker: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """A worker's (prepare, run) stages, when it has both."""
    prepare, run = getattr(worker, "prepare", None), getattr(worker, "run", None)
    return (prepare, run) if callable(prepare) and callable(run) else None


def pipeline(
    worker: Callable[..., Any],
) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]] | None:
    """A pipelined worker's (prepare, launch, complete) stages; None for any other."""
    if not getattr(worker, "pipelined", False):
        return None
    stages = tuple(getattr(worker, name, None) for name in ("prepare", "launch", "complete"))
    if not all(callable(stage) for stage in stages):
        return None
    return stages  # type: ignore[return-value]


def resolve(work: ConcurrentFuture[Any], outcome: Any) -> None:
    """Resolve a pipelined batch's work (running since its launch began)."""
    if not work.done():
        work.set_result(outcome)


def settle_with(work: ConcurrentFuture[Any], step: ConcurrentFuture[Any]) -> None:
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
