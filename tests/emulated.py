"""An emulated accelerator: a model whose forward pass costs the launching thread a fixed CPU
time with the GIL held, then queues its work on an in-order virtual stream that a
synchronisation waits for without the GIL, as a CUDA model's eager launch and its kernels do.

With launch time L and kernel time G a batch, a path that launches and then waits for its
output before launching the next keeps the device busy G/(L+G) of the time at most; a path
that hands the wait to another thread can keep it busy min(1, G/L).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any


class VirtualStream:
    """Work queued in order; each item ends `kernel_s` after the previous one (or after it was
    queued, when the stream was idle)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free_at = 0.0
        self.busy_s = 0.0  # kernel time queued in all

    def enqueue(self, kernel_s: float) -> float:
        """Queue `kernel_s` of work; when it will be done (time.monotonic)."""
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + kernel_s
            self.busy_s += kernel_s
            return self._free_at


@dataclass
class Launched:
    """A batch whose kernels are queued: its rows, ready once the stream reaches `done_at`."""

    rows: list[Any]
    done_at: float


class EmulatedModel:
    """A batch model on the emulated accelerator: rows are each item times 2.

    `pipelined` says whether the batcher may hand `complete` to another thread. Counts, per
    thread name, how often a thread waited on the stream (a synchronisation).
    """

    def __init__(self, launch_s: float, kernel_s: float, *, pipelined: bool) -> None:
        self.launch_s = launch_s
        self.kernel_s = kernel_s
        self.pipelined = pipelined
        self.stream = VirtualStream()
        self.batches = 0
        self.syncs: dict[str, int] = {}
        self.launchers: set[str] = set()
        self._in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()

    def prepare(self, items: list[Any]) -> list[Any]:
        return list(items)

    def launch(self, prepared: list[Any]) -> Launched:
        # Eager launches hold the GIL: a busy loop, not a sleep.
        end = time.monotonic() + self.launch_s
        while time.monotonic() < end:
            pass
        self.launchers.add(threading.current_thread().name)
        with self._lock:
            self.batches += 1
            self._in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self._in_flight)
        return Launched([item * 2 for item in prepared], self.stream.enqueue(self.kernel_s))

    def complete(self, launched: Launched) -> list[Any]:
        name = threading.current_thread().name
        with self._lock:
            self.syncs[name] = self.syncs.get(name, 0) + 1
        delay = launched.done_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # a synchronisation: no GIL held while the device works
        with self._lock:
            self._in_flight -= 1
        return launched.rows

    def run(self, prepared: list[Any]) -> list[Any]:
        return self.complete(self.launch(prepared))

    def __call__(self, items: list[Any]) -> list[Any]:
        return self.run(self.prepare(items))
