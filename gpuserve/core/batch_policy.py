"""When a batch is handed to a worker: the batcher's formation policy, apart from the threads
and futures that carry it out.

The rules (the batcher's docstring states them for its users):
- At an idle worker a batch is dispatched at once, unless callers of the last batch are due
  back (`hold_for_callers`): then it stays open for them, as long as that batch's pass took
  or, if longer, 1.5x the time the batch's callers take to come back at the pace they have
  been coming back since recent batches finished (gRPC's calls come back one by one, each
  paying a thread's wake-up on a shared core); never past `max_wait_s` after the worker
  became free (or after the oldest item came, if later).
- Also with `hold_for_callers`, where calls arrive one at a time in a steady stream (gRPC's
  calls reach the event loop one by one from the threads that take them, so few are
  waiting when a batch finishes), an
  idle worker's batch stays open while they keep coming (4 calls in a row or more, each
  within `max_wait_s` of the one before): until no call has come for twice their recent
  gap, or `max_wait_s`. A hold that
  catches no call stops these holds for the next 1, 2, 4 ... 1024 batches, so that a lone
  client pays about one in a thousand.
- Behind a busy worker a batch grows until it is full or its oldest item has waited
  `max_wait_s`; without `overlap` (the passes and the event loop share the cores), until it is
  full or a worker is free.
- After an out-of-memory error, batches are capped at half the failed size for a while.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

# Calls in a row, each within max_wait_s of the one before, that make a stream worth holding
# for: a burst after a pause is not one.
_STREAM = 4
# How much longer than their recent pace predicts an idle worker waits for callers due back.
_SLACK = 1.5


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
        self._back = 0  # calls arrived since then
        self._pace = 0.0  # the recent seconds per caller for callers to come back
        # The stream of arrivals: when the last call came, the recent gap between calls, and
        # whether holding for them has paid (see `_stream_until`).
        self._last_arrival = -math.inf
        self._gap = math.inf
        self._streak = 0  # calls in a row that came within max_wait_s of the one before
        self._holding: int | None = None  # the items waiting when a stream hold began
        self._skip = 0  # batches to dispatch before the next stream hold
        self._misses = 0  # stream holds in a row that caught nothing

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
                return self._stream_until(waiting, until)
            # One pass at least, or as long as the rest take to come back at the pace callers
            # have been coming back (gRPC's each pay a thread's wake-up on a shared core).
            due = max(self._hold_until, self._free_since + _SLACK * self._load * self._pace)
            until = min(until, due)
        return until if time.monotonic() < until else None

    def arrived(self) -> None:
        """A call's items joined the queue."""
        now = time.monotonic()
        self._back += 1
        if self._back <= self._load:
            pace = (now - self._free_since) / self._back
            self._pace = pace if not self._pace else 0.75 * self._pace + 0.25 * pace
        gap = now - self._last_arrival
        self._last_arrival = now
        if gap >= self.max_wait_s:  # a pause: whatever stream there was has ended
            self._streak, self._gap = 0, math.inf
            return
        self._streak += 1
        self._gap = gap if self._streak == 1 else 0.875 * self._gap + 0.125 * gap

    def _stream_until(self, waiting: int, until: float) -> float | None:
        """Until when an idle worker's batch stays open for calls still streaming in (None:
        dispatch now), `until` at the latest."""
        if self._holding is None:
            if self._skip or self._streak < _STREAM:
                return None
            self._holding = waiting
        until = min(until, self._last_arrival + 2 * self._gap)
        return until if time.monotonic() < until else None

    def dispatched(self, waiting: int) -> None:
        """A batch went to a worker, `waiting` items having waited for it."""
        if self._holding is None:
            self._skip = max(0, self._skip - 1)
            return
        if waiting > self._holding:  # the hold caught calls: hold again next time
            self._misses = 0
        else:
            self._misses = min(self._misses + 1, 11)
            self._skip = 2 ** (self._misses - 1)
        self._holding = None

    def finished(self, held: int, started: float | None) -> None:
        """A batch finished, `held` items waiting or in flight as it did; it had run since
        `started` (None: it never started)."""
        now = time.monotonic()
        self._load = held
        self._free_since = now
        self._back = 0
        self._hold_until = now + (now - started if started is not None else 0.0)

    def out_of_memory(self, size: int) -> int:
        """A batch of `size` ran out of memory: cap batches at half of it for
        `oom_cooldown_s`; the new cap."""
        self._cap = max(1, size // 2)
        self._cap_until = time.monotonic() + self.oom_cooldown_s
        return self._cap
