"""What one request may send: the size of its request line and headers, their number, and
how long its body may take; driven through gpuserve's protocol in-process (the same on a
real socket: tests/test_socket.py)."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from gpuserve.http.connections import HeadLimits, _HeadScan, guarded_protocol

from .test_connections import RecordingTransport

LIMITS = HeadLimits(max_head_bytes=4096, max_headers=20, max_url_bytes=1024, body_timeout_s=10)


class Recorder:
    """An app that answers 200 and remembers what reached it."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.paths.append(scope["path"])
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.bodies.append(body)
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


def connect(app: Any, limits: HeadLimits = LIMITS) -> tuple[Any, RecordingTransport]:
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    config.load()
    protocol = guarded_protocol(10.0, 100, limits)(
        config=config, server_state=ServerState(), app_state={}
    )
    transport = RecordingTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def send(app: Any, *chunks: bytes, limits: HeadLimits = LIMITS) -> RecordingTransport:
    protocol, transport = connect(app, limits)
    for chunk in chunks:
        if transport.closed:
            break
        protocol.data_received(chunk)
        await asyncio.sleep(0)
    for _ in range(10):
        await asyncio.sleep(0.002)
    protocol.connection_lost(None)
    return transport


def refusal(transport: RecordingTransport) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of the one response written, on a closed connection."""
    assert transport.closed and len(transport.writes) == 1, transport.writes
    head, body = transport.writes[0].split(b"\r\n\r\n", 1)
    assert b"connection: close" in head and b"x-request-id: " in head
    return int(head.split()[1]), json.loads(body)


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


HEAD = b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"


@pytest.mark.parametrize("seed", range(20))
def test_the_head_scan_counts_a_head_however_it_is_split(seed: int) -> None:
    head = HEAD + b"".join(b"x-%d: %s\r\n" % (i, b"v" * i) for i in range(12)) + b"\r\n"
    request = head + b'{"inputs": [1]}'
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(request)), rng.randint(1, 30)))
    scan, complete_at = _HeadScan(), None
    for start, end in zip([0, *cuts], [*cuts, len(request)], strict=True):
        if scan.feed(request[start:end]):
            complete_at = end
            break
    assert complete_at is not None and complete_at >= len(head)
    assert scan.bytes == len(head) - 2  # up to the last header's CRLF
    assert scan.first_line == len(b"POST /predict HTTP/1.1")
    assert scan.lines == head.count(b"\r\n") - 1  # the request line and each header


@pytest.mark.anyio
@pytest.mark.parametrize("chunk", [1 << 30, 4096, 7])
async def test_a_long_request_line_gets_414_before_it_is_parsed(chunk: int) -> None:
    app = Recorder()
    line = b"GET /" + b"a" * 5_000_000 + b" HTTP/1.1\r\nhost: x\r\n\r\n"
    # 7-byte pieces of the first 20 kB: enough to pass the limit, byte-wise.
    pieces = chunked(line if chunk > 7 else line[:20_000], chunk)
    status, body = refusal(await send(app, *pieces))
    assert status == 414 and "request line is longer than 1024 bytes" in body["error"]
    assert body["request_id"] and app.paths == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (b"".join(b"x-%d: 1\r\n" % i for i in range(21)), "more than 20 header fields"),
        (b"x-big: " + b"v" * 5000 + b"\r\n", "headers are larger than 4096 bytes"),
        (b"".join(b"x-%d: %s\r\n" % (i, b"v" * 300) for i in range(15)), "larger than 4096"),
    ],
)
async def test_too_many_or_too_large_headers_get_431(headers: bytes, reason: str) -> None:
    app = Recorder()
    request = HEAD + headers + b"content-length: 2\r\n\r\n{}"
    for pieces in ([request], chunked(request, 5)):
        status, body = refusal(await send(app, *pieces))
        assert status == 431 and reason in body["error"]
    assert app.paths == []


@pytest.mark.anyio
async def test_a_request_within_every_limit_is_served_however_it_arrives() -> None:
    app = Recorder()
    headers = b"".join(b"x-%d: %s\r\n" % (i, b"v" * 100) for i in range(17))
    request = b"POST /" + b"p" * 900 + b" HTTP/1.1\r\nhost: x\r\n" + headers
    request += b"content-length: 2\r\n\r\n{}"
    for pieces in ([request], chunked(request, 3), [request + request]):
        transport = await send(app, *pieces)
        assert transport.writes and all(w.startswith(b"HTTP/1.1 200") for w in transport.writes)
    assert len(app.bodies) == 4 and set(app.bodies) == {b"{}"}


@pytest.mark.anyio
@pytest.mark.parametrize(("asked", "limit_s"), [(None, 0.05), (b"30", 10.0)])
async def test_a_body_that_does_not_arrive_in_time_gets_408(
    asked: bytes | None, limit_s: float
) -> None:
    app = Recorder()
    limits = HeadLimits(body_timeout_s=limit_s)
    protocol, transport = connect(app, limits)
    extra = b"" if asked is None else b"x-request-timeout-ms: " + asked + b"\r\n"
    protocol.data_received(HEAD + extra + b"content-length: 100\r\n\r\n" + b"{" * 10)
    for _ in range(200):
        await asyncio.sleep(0.005)
        if transport.closed:
            break
    status, body = refusal(transport)
    assert status == 408 and "body did not arrive within" in body["error"]
    assert app.bodies == []  # the app saw its client go, and answered nobody
    protocol.connection_lost(None)


@pytest.mark.anyio
async def test_a_body_that_arrives_in_time_leaves_no_timer() -> None:
    app = Recorder()
    protocol, transport = connect(app, HeadLimits(body_timeout_s=0.05))
    protocol.data_received(HEAD + b"content-length: 4\r\n\r\n{}")
    assert protocol._body_timer is not None  # the body is still coming
    protocol.data_received(b"  ")
    await asyncio.sleep(0.1)  # past the limit: nothing fires
    assert protocol._body_timer is None and not transport.closed
    assert transport.writes and transport.writes[0].startswith(b"HTTP/1.1 200")
    assert app.bodies == [b"{}  "]
    protocol.connection_lost(None)
