"""A front's end of the engine's socket.

Requests go out once per event-loop turn, all of that turn's in one message; answers and
model states come in on one task. When the connection to the engine drops (it died, or is
being replaced), every request waiting on it fails at once with NotReady, and the models
read as loading until the engine says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from gpuserve.core.errors import GpuserveError, NotReady
from gpuserve.engine import wire

logger = logging.getLogger("gpuserve.engine.link")

_ENGINE_GONE = "the engine process stopped; it is being restarted"


class EngineLink:
    """Requests to the engine and their answers; the models' states as the engine sees them."""

    def __init__(self, address: str, identity: str) -> None:
        self._address, self._identity = address, identity.encode()
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[wire.Answer]] = {}
        self._outbox: list[wire.Request] = []
        self._aborts: list[int] = []
        self._flush_due = False
        self.states: dict[tuple[str, str], wire.ModelState] = {}
        self.connected = False
        self._changed = asyncio.Event()
        # Called on every change of the states, before `changed` returns to its waiters.
        self.listeners: list[Callable[[], None]] = []
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        context = self._context = zmq.asyncio.Context()
        sock = self._socket = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self._identity)
        sock.setsockopt(zmq.LINGER, 0)
        # Nothing queues for an engine that is not there: a request then fails at once.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(self._address)
        self._tasks = [
            asyncio.create_task(self._receive(sock), name="gpuserve-link-receive"),
            asyncio.create_task(self._watch(sock, monitor), name="gpuserve-link-watch"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_waiting(NotReady("the server is shutting down", retry_after_s=5))
        if self._socket is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._socket.disable_monitor()
            self._socket.close()
        if self._context is not None:
            self._context.term()

    async def changed(self) -> None:
        """Until the next change of the engine's states (or of the connection)."""
        self._changed.clear()
        await self._changed.wait()

    def submit(self, request: wire.Request) -> asyncio.Future[wire.Answer]:
        """Send a request (with this turn's others) and a future for its answer."""
        future: asyncio.Future[wire.Answer] = asyncio.get_running_loop().create_future()
        if not self.connected:
            future.set_exception(NotReady(_ENGINE_GONE, retry_after_s=2))
            return future
        self._waiting[request.id] = future
        self._outbox.append(request)
        self._schedule_flush()
        return future

    def next_id(self) -> int:
        return next(self._ids)

    def abort(self, request_id: int) -> None:
        """The caller is gone: the engine drops the request, and its answer is not awaited."""
        if self._waiting.pop(request_id, None) is not None:
            self._aborts.append(request_id)
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        requests, self._outbox = self._outbox, []
        aborts, self._aborts = self._aborts, []
        assert self._socket is not None
        if aborts:
            wire.send_now(self._socket, wire.pack(wire.ABORT, aborts)).add_done_callback(
                wire.ignore_failure
            )
        if requests:
            sending = wire.send_now(self._socket, wire.pack(wire.INFER, requests))
            sending.add_done_callback(functools.partial(self._sent, requests))

    def _sent(self, requests: list[wire.Request], sending: asyncio.Future[Any]) -> None:
        if sending.cancelled() or sending.exception() is not None:  # no engine to take them
            for request in requests:
                self._fail(request.id, NotReady(_ENGINE_GONE, retry_after_s=2))

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            try:
                kind, payload = wire.unpack(frames)
            except Exception:
                logger.exception("a message from the engine could not be read")
                continue
            if kind == wire.ANSWERS:
                for answer in payload:
                    future = self._waiting.pop(answer.id, None)
                    if future is not None and not future.done():
                        future.set_result(answer)
            elif kind == wire.STATES:
                for state in payload:
                    self.states[state.model] = state
                self._announce()

    async def _watch(self, sock: zmq.asyncio.Socket, monitor: Any) -> None:
        """Follow the connection: say hello on each (re)connection; on a drop, fail what
        waits and forget the states, which the next engine will send."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_CONNECTED:
                    self.connected = True
                    await sock.send_multipart(wire.pack(wire.HELLO, None))
                elif event["event"] == zmq.EVENT_DISCONNECTED:
                    if self.connected:
                        logger.error("lost the engine; failing %d requests", len(self._waiting))
                    self.connected = False
                    self.states.clear()
                    self._fail_waiting(NotReady(_ENGINE_GONE, retry_after_s=2))
                    self._announce()
        finally:
            monitor.close()

    def _announce(self) -> None:
        for listener in list(self.listeners):
            listener()
        self._changed.set()

    def _fail_waiting(self, error: GpuserveError) -> None:
        for request_id in list(self._waiting):
            self._fail(request_id, error)

    def _fail(self, request_id: int, error: GpuserveError) -> None:
        future = self._waiting.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(error)
