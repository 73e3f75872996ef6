"""Load progress: how much of a model's files has been read, and what the load is doing.

A 10 GB model takes minutes to read, and a silent wait looks like a hang. The load thread
tracks one `LoadProgress` (`tracking`); the file loaders open model files through
`open_counted`, which counts the bytes read into it. The log gets a line every few seconds,
and `/health/ready` shows the figures while the model loads.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger("gpuserve.model.loading")

# How often a long read is logged.
_LOG_EVERY_S = 5.0


class LoadProgress:
    """One model's load: its phase, and bytes read of the files' total.

    Written by the load thread, read by the event loop: each field is one assignment of an
    immutable value, so a reader sees a recent state, never a torn one.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self.phase = "starting"
        self.bytes_total = 0
        self.bytes_read = 0
        self.started = time.monotonic()
        self._logged = self.started

    def to_dict(self) -> dict[str, Any]:
        """For /health/ready: phase, bytes read of total, seconds so far."""
        body: dict[str, Any] = {
            "phase": self.phase,
            "seconds": round(time.monotonic() - self.started, 1),
        }
        if self.bytes_total:
            body["bytes_read"] = min(self.bytes_read, self.bytes_total)
            body["bytes_total"] = self.bytes_total
        return body

    def enter(self, phase: str) -> None:
        """The load has moved on to `phase` (reading, placing on the device, warming up)."""
        self.phase = phase

    def expect(self, size: int) -> None:
        """Another file of `size` bytes is to be read."""
        self.bytes_total += size

    def advance(self, size: int) -> None:
        self.bytes_read += size
        now = time.monotonic()
        if now - self._logged >= _LOG_EVERY_S:
            self._logged = now
            read, total = min(self.bytes_read, self.bytes_total), max(self.bytes_total, 1)
            logger.info(
                "loading %s: %.1f of %.1f MiB read (%.0f%%), %.0fs",
                self.model,
                read / 2**20,
                total / 2**20,
                100 * read / total,
                now - self.started,
            )


_current = threading.local()


@contextlib.contextmanager
def tracking(progress: LoadProgress) -> Iterator[LoadProgress]:
    """Make `progress` the one this thread's file reads count into."""
    previous = getattr(_current, "progress", None)
    _current.progress = progress
    try:
        yield progress
    finally:
        _current.progress = previous


def current() -> LoadProgress | None:
    """The progress this thread tracks, if any."""
    progress: LoadProgress | None = getattr(_current, "progress", None)
    return progress


def enter(phase: str) -> None:
    """Set this thread's load phase, when one is tracked."""
    progress = current()
    if progress is not None:
        progress.enter(phase)


def open_counted(path: Path) -> BinaryIO:
    """`path` opened for reading; the bytes read count into this thread's progress."""
    progress = current()
    handle = path.open("rb")
    if progress is None:
        return handle
    progress.expect(path.stat().st_size)
    progress.enter(f"reading {path.name}")
    return io.BufferedReader(_Counted(handle, progress), buffer_size=1 << 20)


class _Counted(io.RawIOBase):
    """A read-only file that counts what is read through it; seeks pass through."""

    def __init__(self, inner: BinaryIO, progress: LoadProgress) -> None:
        super().__init__()
        self._inner = inner
        self._progress = progress

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self._inner.readinto(buffer)  # type: ignore[attr-defined]
        self._progress.advance(count or 0)
        return int(count or 0)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def close(self) -> None:
        self._inner.close()
        super().close()
