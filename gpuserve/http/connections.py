"""gpuserve's HTTP protocol: uvicorn's, with connection limits, hang-up notice, one write
per response.

uvicorn closes a kept-alive connection that stays idle, but not one that never sends a
request, nor one that sends its headers a byte at a time, nor one that trickles its body; it
parses a request line and headers of any size and number; and it accepts connections until the
process runs out of file descriptors, when every new client is reset. These limits are the
HTTP front's, not the app's, so they sit in uvicorn's protocol rather than in ASGI middleware:
a connection refused here never reaches the app. It also writes each response's head and
body in one call rather than two (`CoalescedWrites`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gpuserve.core.envelope import new_request_id
from gpuserve.http.responses import HangUp

logger = logging.getLogger("gpuserve.connections")

# Untyped on purpose: the subclass swaps the transport for `CoalescedWrites`, and works on
# httptools' parser callbacks, which uvicorn's annotations do not describe.
_HttpTools: Any = HttpToolsProtocol

# Descriptors kept back from the connection cap for the model files, logs, pipes and sockets
# the process opens besides its clients.
_RESERVED_FDS = 128


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:  # some sandboxes refuse even this
            logger.warning("could not raise the open-file limit from %d: %s", soft, exc)
    return soft


def connection_cap(max_connections: int, fd_limit: int, listeners: int = 1) -> int:
    """The cap to enforce on each of `listeners` (HTTP, and gRPC beside it): the setting, or
    what the descriptor limit leaves room for when every listener is full."""
    room = max(1, (fd_limit - _RESERVED_FDS) // listeners)
    if max_connections > room:
        logger.warning(
            "max_connections %d is above what %d open files allow; capping at %d",
            max_connections,
            fd_limit,
            room,
        )
    return min(max_connections, room)


@dataclass(frozen=True)
class HeadLimits:
    """What one request may send: its head's size, its header count, its request line's
    length, and how long its body may take once its headers are in."""

    max_head_bytes: int = 65536
    max_headers: int = 100
    max_url_bytes: int = 8192
    body_timeout_s: float = 60.0


class _HeadScan:
    """Counts a request head's bytes, lines and request line as they arrive, before the
    parser sees them, so that an oversized head is refused having cost a scan of what came
    (in C: `find` and `count`), never a parse or a copy of all of it."""

    __slots__ = ("bytes", "first_line", "lines", "tail")

    def __init__(self) -> None:
        self.bytes = 0
        self.lines = 0  # CRLFs seen: the request line's, then one per header
        self.first_line: int | None = None  # the request line's length, once it ends
        self.tail = b""  # the last 3 bytes, for a CRLF CRLF split across reads

    def feed(self, data: bytes) -> bool:
        """Count `data`; True once the head is complete (the rest of `data` is its body)."""
        joined = self.tail + data
        end = joined.find(b"\r\n\r\n")
        seen = joined if end < 0 else joined[: end + 2]
        skip = len(self.tail)
        if self.first_line is None:
            line_end = seen.find(b"\r\n")
            if line_end >= 0:
                self.first_line = self.bytes - skip + line_end
        # CRLFs inside the tail were counted with the read before.
        self.lines += seen.count(b"\r\n") - self.tail.count(b"\r\n")
        self.bytes += len(seen) - skip
        self.tail = joined[-3:]
        return end >= 0

    def problem(self, limits: HeadLimits) -> tuple[int, str] | None:
        """The status and reason to refuse this head with, if it is past a limit."""
        request_line = self.first_line if self.first_line is not None else self.bytes
        if request_line > limits.max_url_bytes:
            return 414, f"the request line is longer than {limits.max_url_bytes} bytes"
        if self.lines - 1 > limits.max_headers:
            return 431, f"more than {limits.max_headers} header fields"
        if self.bytes > limits.max_head_bytes:
            return 431, f"the request's headers are larger than {limits.max_head_bytes} bytes"
        return None


def guarded_protocol(
    header_timeout_s: float, max_connections: int, limits: HeadLimits | None = None
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with gpuserve's limits; pass it as `uvicorn.Config(http=...)`.

    - A connection past `max_connections` gets a 503 in the error shape, with Retry-After, and
      is closed at once, before it can hold a descriptor.
    - A request's headers must arrive within `header_timeout_s` of its first byte, and a new
      connection must send its headers within `header_timeout_s` of opening; otherwise the
      connection is closed. Between requests, uvicorn's keep-alive timeout applies as before.
    - A request line past `limits.max_url_bytes` gets 414, a head past `max_head_bytes` or
      with more than `max_headers` fields 431, counted before anything is parsed; the
      connection is closed.
    - A body must arrive within `body_timeout_s` of its headers (or of the request's own
      X-Request-Timeout-Ms, when shorter), or the request gets 408 and the connection closes.
    """
    bounds = limits or HeadLimits()

    class GuardedHTTPProtocol(_HttpTools):
        _header_timer: asyncio.TimerHandle | None = None
        _armed_for: Any = None  # the request cycle current when the timer was armed
        _scan: _HeadScan | None = None  # the head arriving, while its end has not
        _body_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(_refusal(max_connections))
                transport.close()
                return
            # The requests' cycles take the protocol's transport when each request begins.
            self.transport = CoalescedWrites(transport)
            self._arm()

        def on_response_complete(self) -> None:
            self.transport.flush()  # a response without a body: its head alone (HEAD, 204)
            super().on_response_complete()

        def data_received(self, data: bytes) -> None:
            if not self._in_request() and self._head_too_large(data):
                return
            super().data_received(data)
            # Most requests arrive whole: their headers are parsed by now, and no timer is
            # needed (one per request cost a timer in the loop's heap for its 10 s). Only a
            # request whose headers are still incomplete after this read is timed, and only
            # a body still incomplete after it.
            if self._in_request():
                self._disarm()
                if self.cycle.more_body and self._body_timer is None:
                    self._arm_body()
            elif self._header_timer is None:
                self._arm()  # part of the next request's headers, on a kept-alive connection

        def _head_too_large(self, data: bytes) -> bool:
            scan = self._scan or _HeadScan()
            complete = scan.feed(data)
            problem = scan.problem(bounds)
            self._scan = None if complete else scan
            if problem is None:
                return False
            status, reason = problem
            self._refuse(status, reason)
            return True

        def _refuse(self, status: int, reason: str) -> None:
            logger.info(
                "refused a request from %s with %d: %s",
                f"{self.client[0]}:{self.client[1]}" if self.client else "?",
                status,
                reason,
            )
            self._scan = None
            self.transport.write(_error_head_and_body(status, reason))
            self.transport.close()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._disarm_body()

        def _arm_body(self) -> None:
            timeout_s = bounds.body_timeout_s
            asked = _asked_timeout_s(self.cycle.scope["headers"])
            if asked is not None:
                timeout_s = min(timeout_s, asked)
            cycle = self.cycle
            self._body_timer = self.loop.call_later(timeout_s, self._body_late, cycle, timeout_s)

        def _disarm_body(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None

        def _body_late(self, cycle: Any, timeout_s: float) -> None:
            self._body_timer = None
            if cycle is not self.cycle or not cycle.more_body or self.transport.is_closing():
                return
            reason = f"the request's body did not arrive within {timeout_s:g}s of its headers"
            if cycle.response_started:
                self.transport.close()
                return
            # The app waits on the body: it sees the client gone, and answers nobody.
            cycle.response_started = cycle.response_complete = True
            self._refuse(408, reason)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            # Each request's own: the app registers what to do if its client goes.
            self.scope["extensions"] = {HangUp.KEY: HangUp()}

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._disarm_body()
            cycle = self.cycle
            super().connection_lost(exc)
            if cycle is not None and cycle.disconnected:
                hangup = cycle.scope.get("extensions", {}).get(HangUp.KEY)
                if hangup is not None:
                    hangup.hung_up()

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _in_request(self) -> bool:
            cycle = self.cycle
            return cycle is not None and not cycle.response_complete

        def _arm(self) -> None:
            self._armed_for = self.cycle
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _headers_late(self) -> None:
            self._header_timer = None
            # A new cycle means the headers came in time: it is the app's request now.
            if self.cycle is not self._armed_for or self.transport.is_closing():
                return
            logger.info(
                "closing a connection from %s: no complete request headers within %gs",
                f"{self.client[0]}:{self.client[1]}" if self.client else "?",
                header_timeout_s,
            )
            self.transport.close()

    return GuardedHTTPProtocol


class CoalescedWrites:
    """A connection's transport that holds a response's head back until its body follows,
    and writes the two at once.

    uvicorn writes the head when the app starts its response and the body when the app sends
    it, two calls of the transport (and two sends to the socket) for every answer; on the
    light model at c=32 the head's write was the costliest line of the server's Python
    (py-spy). Only a head with a Content-Length is held, so a streamed (chunked) response's
    head leaves at once; a held head goes out with the next write, when the response ends
    (`flush`), or before the connection closes.
    """

    __slots__ = ("_head", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head + data)
        elif data.startswith(b"HTTP/1.1 ") and b"\r\ncontent-length:" in data:
            self._head = data
        else:
            self._transport.write(data)

    def flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            if not self._transport.is_closing():  # a client gone mid-answer gets nothing
                self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._head = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        # Everything else (is_closing, get_extra_info, pause_reading...) is the transport's.
        return getattr(self._transport, name)


def _refusal(max_connections: int) -> bytes:
    reason = f"too many open connections (the limit is {max_connections}); retry shortly"
    return _error_head_and_body(503, reason, "retry-after: 1\r\n")


_REASONS = {
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def _error_head_and_body(status: int, reason: str, extra: str = "") -> bytes:
    """A whole response in the error shape, written before (or instead of) the app's, after
    which the connection closes."""
    request_id = new_request_id()
    body = orjson.dumps({"error": reason, "request_id": request_id})
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "content-type: application/json\r\n"
        f"{extra}"
        f"x-request-id: {request_id}\r\n"
        "connection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _asked_timeout_s(headers: Iterable[tuple[bytes, bytes]]) -> float | None:
    """The request's own X-Request-Timeout-Ms, in seconds, where it is a positive number."""
    for name, value in headers:
        if name == b"x-request-timeout-ms":
            try:
                asked = float(value) / 1000
            except ValueError:
                return None
            return asked if asked > 0 else None
    return None
