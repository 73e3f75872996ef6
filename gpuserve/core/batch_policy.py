"""When a batch is handed to a worker: the batcher's formation policy, apart from the threads
and futures that carry it out.

The rules (the batcher's docstring states them for its users):
- At an idle worker a batch is dispatched at once, unless callers of the last batch are due
  back (`hold_for_callers`): then it stays open for them, no longer than that batch's pass
  took nor `max_wait_s` after the worker became free (or after the oldest item came, if later).
- Behind a busy worker a batch grows until it is full or its oldest item has waited
  `max_wait_s`; without `overlap` (the passes and the event loop share the cores), until it is
  full or a worker is free.
- After an out-of-memory error, batches are capped at half the failed size for a while.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class FormationPolicy:
    """The settings and the little state that decide when a waiting batch goes."""

    def __init__(
        self,
        max_batch_size: int,
        max_wait_s: float,
        hold_for_callers: bool,
        overlap: bool,
        oom_cooldown_s: float,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.hold_for_callers = hold_for_callers
        self.overlap = overlap
        self.oom_cooldown_s = oom_cooldown_s
        self._cap = max_batch_size
        self._cap_until = 0.0
        # The items held (waiting and in flight) when the last batch finished, and until when
        # an idle worker may wait for those not back yet.
        self._load = 0
        self._hold_until = 0.0
        self._free_since = 0.0  # when the last batch finished, freeing its worker

    @property
    def batch_cap(self) -> int:
        """The largest batch dispatched now: below max_batch_size after an out-of-memory error."""
        return self._cap if time.monotonic() < self._cap_until else self.max_batch_size

    def open_until(
        self,
        waiting: int,
        oldest: float,
        all_busy: Callable[[], bool],
        in_flight: Callable[[], int],
    ) -> float | None:
        """Until when the waiting batch (`waiting` items, the oldest queued at `oldest`) may
        keep growing (math.inf: until something happens), or None to dispatch it now.
        `all_busy` says whether every worker runs a batch; `in_flight` counts the items in
        batches handed to workers. Both are asked only when needed."""
        if waiting >= self.batch_cap:
            return None
        if all_busy():
            if not self.overlap:
                return math.inf
            until = oldest + self.max_wait_s
        else:
            # Time spent waiting for a busy worker is not time spent waiting for the batch to
            # fill: max_wait_s counts from when the batch could have run.
            until = max(oldest, self._free_since) + self.max_wait_s
            if not self.hold_for_callers:
                return None
            if waiting >= self._load - in_flight():
                return None
            until = min(until, self._hold_until)
        return until if time.monotonic() < until else None

    def finished(self, held: int, started: float | None) -> None:
        """A batch finished, `held` items waiting or in flight as it did; it had run since
        `started` (None: it never started)."""
        now = time.monotonic()
        self._load = held
        self._free_since = now
        self._hold_until = now + (now - started if started is not None else 0.0)

    def out_of_memory(self, size: int) -> int:
        """A batch of `size` ran out of memory: cap batches at half of it for
        `oom_cooldown_s`; the new cap."""
        self._cap = max(1, size // 2)
        self._cap_until = time.monotonic() + self.oom_cooldown_s
        return self._cap
