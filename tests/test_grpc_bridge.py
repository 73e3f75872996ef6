"""The bridge from grpcio's threaded server to the event loop, without sockets: a call's
thread (a plain thread here) runs the handler's coroutine on a loop of its own thread, with a
stand-in for grpc's threaded context."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest

from gpuserve.grpc.bridge import LoopCalls, LoopContext


class Ended(Exception):
    """What the stand-in's abort raises, as grpc's raises an exception of its own."""


class ThreadedContext:
    """What the bridge uses of grpc's threaded servicer context."""

    def __init__(self, remaining: float = 9.2e18, *, ended: bool = False) -> None:
        self.remaining = remaining
        self.callbacks: list[Callable[[], None]] | None = None if ended else []
        self.trailing: Any = None
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> Any:
        return (("x-request-id", "abc"),)

    def time_remaining(self) -> float:
        return self.remaining

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if self.callbacks is None:
            return False
        self.callbacks.append(callback)
        return True

    def end(self) -> None:
        """The call ends from gRPC's side (the client cancelled, or its deadline passed)."""
        callbacks, self.callbacks = self.callbacks or [], None
        for callback in callbacks:
            callback()

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing = metadata

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Ended(details)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own, as the server's does. At the end, no
    call's task may be left running on it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop

    async def left() -> int:
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        return sum(not task.done() for task in tasks)

    assert asyncio.run_coroutine_threadsafe(left(), loop).result(10) == 0
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run `fn` in a call's thread; its result, or the exception it raised, lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_a_calls_work_runs_on_the_loop_and_its_answer_comes_back_with_trailing_metadata(
    loop: asyncio.AbstractEventLoop,
) -> None:
    ran_on: list[int] = []

    async def handler(request: bytes, context: LoopContext) -> bytes:
        ran_on.append(threading.get_ident())
        context.set_trailing_metadata((("x-request-id", "abc"),))
        return request * 2

    context = ThreadedContext()
    assert LoopCalls(loop).unary(handler)(b"ab", context) == b"abab"
    assert ran_on and ran_on[0] != threading.get_ident()  # the loop's thread, not the call's
    assert context.trailing == (("x-request-id", "abc"),)


def test_an_abort_on_the_loop_is_the_threaded_contexts_abort_with_its_metadata(
    loop: asyncio.AbstractEventLoop,
) -> None:
    async def handler(request: bytes, context: LoopContext) -> bytes:
        context.set_trailing_metadata((("x-request-id", "r1"),))
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad input (request id r1)")
        raise AssertionError("abort returned")

    context = ThreadedContext()
    with pytest.raises(Ended):
        LoopCalls(loop).unary(handler)(b"", context)
    assert context.aborted == (grpc.StatusCode.INVALID_ARGUMENT, "bad input (request id r1)")
    assert context.trailing == (("x-request-id", "r1"),)


def test_a_call_ended_by_grpc_cancels_its_task_and_frees_its_thread(
    loop: asyncio.AbstractEventLoop,
) -> None:
    started, cancelled = threading.Event(), threading.Event()

    async def handler(request: bytes, context: LoopContext) -> bytes:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b"late"

    context = ThreadedContext()
    thread, out = in_thread(lambda: LoopCalls(loop).unary(handler)(b"", context))
    assert started.wait(10)
    context.end()
    thread.join(10)
    assert out == [None]  # no answer: the call is over
    assert cancelled.wait(10)


def test_a_call_that_ended_before_it_started_never_waits(
    loop: asyncio.AbstractEventLoop,
) -> None:
    async def handler(request: bytes, context: LoopContext) -> bytes:
        await asyncio.sleep(60)
        return b"late"

    ended = ThreadedContext(ended=True)
    thread, out = in_thread(lambda: LoopCalls(loop).unary(handler)(b"", ended))
    thread.join(10)
    assert not thread.is_alive() and out == [None]


def test_the_deadline_is_the_clients_and_none_without_one() -> None:
    assert LoopContext((), 9.2e18).time_remaining() is None
    assert LoopContext((), None).time_remaining() is None
    timed = LoopContext((), 5.0)
    first = timed.time_remaining()
    assert first is not None and 4.0 < first <= 5.0
    time.sleep(0.01)
    later = timed.time_remaining()
    assert later is not None and later < first


def test_a_streams_items_reach_its_thread_in_order_and_it_ends(
    loop: asyncio.AbstractEventLoop,
) -> None:
    async def handler(request: int, context: LoopContext) -> AsyncIterator[int]:
        for i in range(request):
            await asyncio.sleep(0)
            yield i
        context.set_trailing_metadata((("k", "v"),))

    context = ThreadedContext()
    assert list(LoopCalls(loop).stream(handler)(5, context)) == [0, 1, 2, 3, 4]
    assert context.trailing == (("k", "v"),)


@pytest.mark.parametrize("ended_before", [False, True])
def test_a_stream_ended_by_grpc_frees_its_thread(
    loop: asyncio.AbstractEventLoop, ended_before: bool
) -> None:
    """Also when it ends before its task's first step (which then runs none of its code)."""

    async def forever(request: int, context: LoopContext) -> AsyncIterator[int]:
        while True:
            yield 1
            await asyncio.sleep(0.01)

    context = ThreadedContext(ended=ended_before)
    seen: list[int] = []

    def read() -> None:
        for item in LoopCalls(loop).stream(forever)(0, context):
            seen.append(item)
            if not ended_before and len(seen) == 3:
                context.end()

    thread, out = in_thread(read)
    thread.join(10)
    assert not thread.is_alive() and out == [None]
    assert len(seen) <= 4 if ended_before else len(seen) >= 3


def test_a_refused_streaming_call_answers_its_status_and_no_messages(
    loop: asyncio.AbstractEventLoop,
) -> None:
    async def refuse(requests: Any, context: LoopContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served")

    handler = grpc.stream_stream_rpc_method_handler(refuse)
    bridged = LoopCalls(loop).handler(handler)
    context = ThreadedContext()
    with pytest.raises(Ended):
        list(bridged.stream_stream(iter(()), context))
    assert context.aborted == (grpc.StatusCode.UNIMPLEMENTED, "not served")
