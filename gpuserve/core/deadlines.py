"""Request deadlines (and the batcher's watchdogs) on one timer, rather than one timer each.

`asyncio.timeout` around each request's wait arms a timer and cancels it again, about 5 µs a
request on uvloop, and nearly every such timer is cancelled long before it would fire. Here a
service's requests in flight sit in a dict with their deadline; one timer is armed for the
earliest. Requests share a timeout in the common case, so a new one's deadline is later
than the armed one and costs a dict entry only; the timer fires about once per timeout, finds
the requests then in flight (those of the last few milliseconds, whose deadlines are still
far off) and re-arms for the earliest of them. A request whose deadline passes has its
`expire` callback called (the service fails its futures with `DeadlinePassed`).
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable

# A timer may fire up to a millisecond early (uvloop counts in whole milliseconds): a deadline
# this close is due, rather than re-armed for a moment later.
_EARLY_S = 0.001


class DeadlinePassed(Exception):
    """What a request's futures fail with when its deadline passes before they resolve."""


class Deadlines:
    """The deadlines of requests in flight, on the running loop, with one timer for all."""

    def __init__(self) -> None:
        self._due: dict[int, tuple[float, Callable[[], None]]] = {}
        self._keys = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = math.inf

    def add(self, timeout_s: float, expire: Callable[[], None]) -> int:
        """Call `expire` in `timeout_s` unless discarded before; a key for `discard`."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (tests): the old one's timer is gone with it
            self._loop, self._timer, self._armed_at = loop, None, math.inf
            self._due.clear()
        when = loop.time() + timeout_s
        key = next(self._keys)
        self._due[key] = (when, expire)
        if when < self._armed_at:
            self._arm(when)
        return key

    def discard(self, key: int) -> None:
        """The request is over (answered, failed or cancelled): forget its deadline."""
        self._due.pop(key, None)

    def close(self) -> None:
        """Stop the timer; deadlines of requests still in flight no longer fire."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._armed_at = None, math.inf
        self._due.clear()

    def __len__(self) -> int:
        return len(self._due)

    def _arm(self, when: float) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._expire)
        self._armed_at = when

    def _expire(self) -> None:
        assert self._loop is not None
        self._timer, self._armed_at = None, math.inf
        now = self._loop.time() + _EARLY_S
        earliest = math.inf
        expired = []
        for key, (when, expire) in list(self._due.items()):
            if when <= now:
                del self._due[key]
                expired.append(expire)
            elif when < earliest:
                earliest = when
        if earliest < math.inf:
            self._arm(earliest)
        for expire in expired:
            expire()
