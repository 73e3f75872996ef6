"""grpcio's threaded server, with every call's work on the server's event loop.

grpcio's asyncio server costs a call about twice what its threaded server does on one core
(each step of a call is a hand-off from grpc's poller thread to the loop), and as much as
gpuserve's whole HTTP path. So gRPC is served by the threaded server: a call waits in one of
its threads, while its work runs on the event loop as a coroutine, as it would under the
asyncio server, with a `LoopContext` for the context it reads. The calls of a loop turn meet
the batcher there as HTTP's do.

A call's end reaches the loop: when the client cancels or its deadline passes, grpc's
callback cancels the call's task. An abort on the loop (`LoopContext.abort`) is turned into
the threaded context's abort in the call's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any

import grpc

Metadata = Sequence[tuple[str, Any]]  # a value is str, or bytes for a "-bin" key
_END = object()  # a stream's last item
# The threaded server's time left for a call without a deadline (about 2**63 ns): none.
_NO_DEADLINE_S = 1e9


class Aborted(Exception):
    """A call ended with a status other than OK, raised by `LoopContext.abort`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class LoopContext:
    """What a call's coroutine reads and sets of its call, on the event loop: the parts of
    grpc's servicer context that gpuserve uses, taken from the threaded context at the
    call's start (its metadata, its deadline) and handed back at its end (trailing metadata,
    the abort)."""

    def __init__(self, metadata: Metadata, time_remaining: float | None) -> None:
        self._metadata = tuple(metadata)
        if time_remaining is None or time_remaining > _NO_DEADLINE_S:
            self._deadline: float | None = None
        else:
            self._deadline = time.monotonic() + time_remaining
        self.trailing: Metadata = ()

    def invocation_metadata(self) -> Metadata:
        """The call's metadata, as the client sent it."""
        return self._metadata

    def time_remaining(self) -> float | None:
        """Seconds left before the client's deadline; None when it set none."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        """Metadata sent with the call's status."""
        self.trailing = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        """End the call with `code`; raises `Aborted`, as grpc's own abort raises."""
        raise Aborted(code, details)


Unary = Callable[[Any, LoopContext], Coroutine[Any, Any, Any]]
Streaming = Callable[[Any, LoopContext], AsyncIterator[Any]]


class LoopCalls:
    """Turns coroutine handlers into the threaded server's handlers, run on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def unary(self, handler: Unary) -> Callable[[Any, grpc.ServicerContext], Any]:
        """A unary-unary (or unary) handler: `handler`'s coroutine, run on the loop."""

        def run(request: Any, context: grpc.ServicerContext) -> Any:
            work, on_loop = self._start(lambda on_loop: handler(request, on_loop), context)
            return _answer(work, on_loop, context)

        return run

    def stream(self, handler: Streaming) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        """A unary-stream handler: `handler`'s async iterator, run on the loop, its items
        passed to the call's thread as they come."""

        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            items: queue.SimpleQueue[Any] = queue.SimpleQueue()

            async def feed(on_loop: LoopContext) -> None:
                async for item in handler(request, on_loop):
                    items.put(item)

            work, on_loop = self._start(feed, context)
            # However the work ends: a task cancelled before its first step runs no code.
            work.add_done_callback(lambda _: items.put(_END))
            while (item := items.get()) is not _END:
                yield item
            _answer(work, on_loop, context)

        return run

    def _start(
        self,
        work_of: Callable[[LoopContext], Coroutine[Any, Any, Any]],
        context: grpc.ServicerContext,
    ) -> tuple[concurrent.futures.Future[Any], LoopContext]:
        """Start a call's work on the loop, with the loop's view of its context."""
        on_loop = LoopContext(context.invocation_metadata(), context.time_remaining())
        future = asyncio.run_coroutine_threadsafe(work_of(on_loop), self._loop)
        # Runs once the call ends, however it ends; cancelling a finished call does nothing.
        if not context.add_callback(future.cancel):
            future.cancel()  # it ended already
        return future, on_loop

    def handler(self, found: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`found` (a coroutine handler, as grpc's helpers build it) for the threaded server.

        A client-streaming call's coroutine gets the messages' iterator, which it must not
        read on the loop: gpuserve's only such call (streamed inference) is refused unread,
        so it runs as a unary call and answers no messages."""
        replace = found._replace
        if found.request_streaming and found.response_streaming:
            return replace(stream_stream=_no_messages(self.unary(found.stream_stream)))
        if found.request_streaming:
            return replace(stream_unary=self.unary(found.stream_unary))
        if found.response_streaming:
            return replace(unary_stream=self.stream(found.unary_stream))
        return replace(unary_unary=self.unary(found.unary_unary))

    def service(self, name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> Any:
        """A generic handler of the service `name`, its methods run on the loop."""
        mine = {method: self.handler(found) for method, found in handlers.items()}
        return grpc.method_handlers_generic_handler(name, mine)


def _answer(
    work: concurrent.futures.Future[Any], on_loop: LoopContext, context: grpc.ServicerContext
) -> Any:
    """Wait for a call's work: its result; None when the call has ended (cancelled, or past
    its deadline: no answer); the threaded context's abort when the work aborted."""
    try:
        return work.result()
    except concurrent.futures.CancelledError:
        return None
    except Aborted as exc:
        context.abort(exc.code, exc.details)  # raises
    finally:
        # Sent with the status, which grpc sends once this returns or raises.
        context.set_trailing_metadata(on_loop.trailing)


def _no_messages(
    call: Callable[[Any, grpc.ServicerContext], Any],
) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
    def run(requests: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        call(requests, context)
        yield from ()

    return run
