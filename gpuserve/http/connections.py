"""gpuserve's HTTP protocol: uvicorn's, with connection limits, hang-up notice, one write
per response.

uvicorn closes a kept-alive connection that stays idle, but not one that never sends a
request, nor one that sends its headers a byte at a time; and it accepts connections until the
process runs out of file descriptors, when every new client is reset. These limits are the
HTTP front's, not the app's, so they sit in uvicorn's protocol rather than in ASGI middleware:
a connection refused here never reaches the app. It also writes each response's head and
body in one call rather than two (`CoalescedWrites`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import orjson
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from gpuserve.core.envelope import new_request_id
from gpuserve.http.responses import HangUp

logger = logging.getLogger("gpuserve.connections")

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


def connection_cap(max_connections: int, fd_limit: int) -> int:
    """The cap to enforce: the setting, or what the descriptor limit leaves room for."""
    room = max(1, fd_limit - _RESERVED_FDS)
    if max_connections > room:
        logger.warning(
            "max_connections %d is above what %d open files allow; capping at %d",
            max_connections,
            fd_limit,
            room,
        )
    return min(max_connections, room)


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with both limits; pass it as `uvicorn.Config(http=...)`.

    - A connection past `max_connections` gets a 503 in the error shape, with Retry-After, and
      is closed at once, before it can hold a descriptor.
    - A request's headers must arrive within `header_timeout_s` of its first byte, and a new
      connection must send its headers within `header_timeout_s` of opening; otherwise the
      connection is closed. Between requests, uvicorn's keep-alive timeout applies as before.
    """

    class GuardedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None
        _armed_for: Any = None  # the request cycle current when the timer was armed

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
            super().data_received(data)
            # Most requests arrive whole: their headers are parsed by now, and no timer is
            # needed (one per request cost a timer in the loop's heap for its 10 s). Only a
            # request whose headers are still incomplete after this read is timed.
            if self._in_request():
                self._disarm()
            elif self._header_timer is None:
                self._arm()  # part of the next request's headers, on a kept-alive connection

        def on_message_begin(self) -> None:
            super().on_message_begin()
            # Each request's own: the app registers what to do if its client goes.
            self.scope["extensions"] = {HangUp.KEY: HangUp()}

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
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
    request_id = new_request_id()
    body = orjson.dumps(
        {
            "error": f"too many open connections (the limit is {max_connections}); retry shortly",
            "request_id": request_id,
        }
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "content-type: application/json\r\n"
        "retry-after: 1\r\n"
        f"x-request-id: {request_id}\r\n"
        "connection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body
