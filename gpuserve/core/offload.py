"""Decoding off the event loop: a large body is decoded in a separate process.

Parsing a large JSON body holds the GIL for its whole length: pydantic-core, orjson and numpy
each turn it into objects in one C call. A thread would not help, and on the event loop a 4 MB
body stalled every other client for 40-140 ms (a normal client's p99 went from 2 to 188 ms
beside four bad 4 MB bodies a second). So bodies of `offload_bytes` or more are decoded in a
separate process, one at a time per process, while the event loop keeps serving; small
bodies, the common case, are decoded inline, where they cost no hand-off.

The codecs' decoders are pure functions of the body and the spec, so they run the same in
either place.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from gpuserve.core.errors import InferenceError, NotReady

logger = logging.getLogger("gpuserve.core.offload")

T = TypeVar("T")


class BodyDecoder:
    """Runs a decoder inline for a small body, or in a parse process for a large one.

    The processes start on the first large body (spawned fresh: a fork would copy the
    server's threads and torch state), and `close` stops them.
    """

    def __init__(self, offload_bytes: int, processes: int) -> None:
        self.offload_bytes = offload_bytes
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False

    async def run(
        self, body: Any, decode: Callable[..., T], *args: Any, size: int | None = None
    ) -> T:
        """`decode(body, *args)`, where it costs the event loop least: in a parse process
        when `size` (by default the body's length) reaches `offload_bytes`."""
        # `offloads`, inline: this runs for every request, and a call costs more than this.
        if self.processes == 0 or (len(body) if size is None else size) < self.offload_bytes:
            return decode(body, *args)
        if self._closed:
            raise NotReady("the server is stopping", retry_after_s=5)
        pool = self._pool = self._pool or self._start()
        try:
            return await asyncio.wrap_future(pool.submit(decode, body, *args))
        except BrokenProcessPool as exc:
            # A parse process died (killed for its memory, say): start afresh for the others.
            logger.error("a body parse process died; starting a new one", exc_info=exc)
            if self._pool is pool:
                self._pool = None
            pool.shutdown(wait=False)
            raise InferenceError("internal error") from exc

    def offloads(self, size: int) -> bool:
        """Whether a body of `size` bytes is decoded in a parse process."""
        return self.processes > 0 and size >= self.offload_bytes

    def close(self) -> None:
        """Stop the parse processes, a parse in progress included (the requests have been
        answered by now); a large body arriving after this gets 503."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            _stop(pool)

    def _start(self) -> ProcessPoolExecutor:
        logger.info("starting %d process(es) to parse large bodies", self.processes)
        return ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=die_with_parent,
            initargs=(os.getpid(),),
        )


def _stop(pool: ProcessPoolExecutor) -> None:
    """Shut `pool` down without waiting for a parse in progress: the executor's exit handler
    would otherwise hold the server's exit until that parse ends."""
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14 and later
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    if terminate is not None:
        terminate()
    else:
        for process in processes:
            if process.is_alive():
                process.terminate()
    # Then join the executor's manager thread (quick, its processes gone): left running, it
    # could close its wake-up pipe while the exit handler writes to it, and the process
    # would exit 1 on "Bad file descriptor".
    pool.shutdown(wait=True)


def die_with_parent(parent: int) -> None:
    """A parse process's start: it ends when the server process that started it does, even
    one killed without a chance to stop it (Linux's parent-death signal)."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the server died before the signal was asked for
        os._exit(0)


_PR_SET_PDEATHSIG = 1
