"""Connection limits: the cap against the open-file limit, and raising that limit; each
response in one write, driven through the protocol in-process.

The limits at work on a real socket (silent and half-sent connections closed, connections past
the cap refused with a JSON 503) are in tests/test_socket.py.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from gpuserve.http.connections import (
    CoalescedWrites,
    connection_cap,
    guarded_protocol,
    raise_fd_limit,
)


def test_the_cap_is_the_setting_when_the_open_file_limit_has_room() -> None:
    assert connection_cap(2048, 20000) == 2048


def test_the_cap_is_lowered_with_a_warning_to_what_the_open_file_limit_allows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="gpuserve.connections"):
        assert connection_cap(2048, 1024) == 1024 - 128
    assert "capping at 896" in caplog.text


def test_the_soft_open_file_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        raised = raise_fd_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
        assert hard == resource.RLIM_INFINITY or raised == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class RecordingTransport(asyncio.Transport):
    """A socket's transport as the protocol sees it, recording each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def plain(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b'{"ok":true}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def streamed(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await asyncio.sleep(0.01)  # the head must not wait for this
    await send({"type": "http.response.body", "body": b"part", "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def connect(app: Any) -> tuple[asyncio.Protocol, RecordingTransport]:
    """gpuserve's HTTP protocol for `app`, on a new connection's recording transport."""
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    config.load()
    protocol = guarded_protocol(10.0, 100)(config=config, server_state=ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def exchange(app: Any, request: bytes, settle: int = 20) -> RecordingTransport:
    """`request` through gpuserve's protocol in-process; the transport's writes after it."""
    protocol, transport = connect(app)
    protocol.data_received(request)
    for _ in range(settle):
        await asyncio.sleep(0.002)
    protocol.connection_lost(None)
    return transport


GET = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"


@pytest.mark.anyio
async def test_a_response_leaves_in_one_write_head_and_body() -> None:
    transport = await exchange(plain, GET + GET)  # two requests on one kept-alive connection
    assert len(transport.writes) == 2
    for write in transport.writes:
        assert write.startswith(b"HTTP/1.1 200 OK\r\n") and write.endswith(b'\r\n\r\n{"ok":true}')


@pytest.mark.anyio
async def test_a_head_without_a_body_still_leaves() -> None:
    transport = await exchange(plain, b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert len(transport.writes) == 1 and transport.writes[0].endswith(b"\r\n\r\n")
    assert b"content-length: 11" in transport.writes[0]


@pytest.mark.anyio
async def test_a_closing_connection_sends_its_answer_before_it_closes() -> None:
    transport = await exchange(plain, b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert transport.closed and len(transport.writes) == 1
    assert transport.writes[0].endswith(b'{"ok":true}')


@pytest.mark.anyio
async def test_a_streamed_response_head_is_not_held() -> None:
    protocol, transport = connect(streamed)
    protocol.data_received(GET)
    await asyncio.sleep(0.001)
    # The head is out while the app still waits for its first part.
    assert [w[:17] for w in transport.writes] == [b"HTTP/1.1 200 OK\r\n"]
    await asyncio.sleep(0.05)
    assert b"".join(transport.writes[1:]) == b"4\r\npart\r\n0\r\n\r\n"
    protocol.connection_lost(None)


def test_a_held_head_is_dropped_when_its_client_is_gone() -> None:
    transport = RecordingTransport()
    writes = CoalescedWrites(transport)
    writes.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert transport.writes == []  # held for its body
    transport.closed = True  # the connection was lost before the body came
    writes.close()
    assert transport.writes == []
