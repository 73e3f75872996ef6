"""Running a batch so that one bad item fails alone: the batch is retried in halves, down to
single items, and whatever a model raises becomes its item's answer.

Runs in worker threads; knows nothing of torch or HTTP (the model says which errors are
out-of-memory and which end a worker for good).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from gpuserve.core.errors import InferenceError

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger("gpuserve.core.batcher")


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


@dataclass(slots=True)
class Outcome(Generic[R]):
    """What the worker hands back: a result or an error per item, in order."""

    results: list[R | BaseException] = field(default_factory=list)
    ran: list[int] = field(default_factory=list)  # indices of the entries that were processed
    forward_s: float = 0.0
    oom_splits: int = 0
    fatal: str | None = None  # the worker can never run again (a broken device context)


def run_isolating(
    items: list[T],
    outcome: Outcome[R],
    process: Callable[[list[T]], Sequence[R]],
    attempt: Callable[[], Sequence[R]] | None = None,
    *,
    is_oom: Callable[[BaseException], bool] = is_memory_error,
    is_fatal: Callable[[BaseException], bool] = never_fatal,
    name: str = "batcher",
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
    if is_fatal(error):
        # Retrying on a broken device would fail again: the whole batch fails, and the
        # worker leaves service.
        logger.critical("%s: fatal error, this copy stops serving", name, exc_info=error)
        outcome.fatal = f"the model failed for good: {type(error).__name__}: {error}"
        outcome.results.extend([deliverable(error)] * len(items))
        return
    # Out of the except block, so the failed attempt's frames, and the tensors they hold,
    # can be freed before the halves run (on a GPU, the halves need that memory).
    oom = is_oom(error)
    if len(items) == 1:
        logger.error("%s: an item failed%s", name, " (out of memory)" * oom, exc_info=error)
        outcome.results.append(deliverable(error))
        return
    outcome.oom_splits += oom
    logger.warning(
        "%s: batch of %d failed (%s: %s); retrying in halves",
        name,
        len(items),
        type(error).__name__,
        error,
    )
    traceback.clear_frames(error.__traceback__)
    del error
    middle = len(items) // 2
    run_isolating(items[:middle], outcome, process, is_oom=is_oom, is_fatal=is_fatal, name=name)
    if outcome.fatal is not None:  # the first half broke the device: do not go on
        outcome.results.extend([deliverable(RuntimeError(outcome.fatal))] * (len(items) - middle))
        return
    run_isolating(items[middle:], outcome, process, is_oom=is_oom, is_fatal=is_fatal, name=name)
