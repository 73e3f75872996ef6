"""Bodies in and out: reading a request body safely, encoding JSON, and the one place an error
becomes an HTTP response (its status from `protocols.status`)."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from gpuserve.core.calls import Received
from gpuserve.core.errors import (
    ClientDisconnected,
    ErrorKind,
    GpuserveError,
    InferenceError,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from gpuserve.protocols.status import http_protocol, http_status

_T = TypeVar("_T")
# Where a request's CallRecord lies in its scope's state (`request.state.call`).
CALL = "call"
logger = logging.getLogger("gpuserve.http")


class JSON(Response):
    """A JSON response built straight from its bytes: Starlette's Response works its
    headers out through a mapping on every request, and this is every answer's path."""

    media_type = "application/json"

    def __init__(
        self, content: bytes, status_code: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        if headers:  # errors with Retry-After and the like: the general path
            super().__init__(content, status_code, headers)
            return
        self.body = content
        self.status_code = status_code
        self.background = None
        self.raw_headers = [
            (b"content-length", str(len(content)).encode()),
            (b"content-type", b"application/json"),
        ]


def json_response(
    body: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """orjson, numpy arrays included: several times faster than the standard library."""
    return JSON(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status_code, headers)


def error_response(exc: GpuserveError, scope: Scope) -> Response:
    """The one place an error becomes an HTTP response: the status its kind has under the
    route's protocol, its message, the request id, and Retry-After or WWW-Authenticate."""
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    if exc.kind is ErrorKind.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    status = http_status(exc.kind, http_protocol(_route(scope)))
    body = {"error": exc.message, "request_id": request_id_of(scope)}
    return json_response(body, status, headers)


def request_id_of(scope: Scope) -> str:
    """The request's id, as its X-Request-Id header and log line carry it."""
    record = scope.get("state", {}).get(CALL)
    return "" if record is None else str(record.request_id)


def _route(scope: Scope) -> str:
    route = scope.get("route")
    return "" if route is None else str(getattr(route, "path", ""))


async def on_gpuserve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GpuserveError)
    if exc.kind is ErrorKind.INTERNAL:
        cause = exc.__cause__ or exc
        request_id = request_id_of(request.scope)
        logger.error("request %s failed: %s", request_id, exc.message, exc_info=cause)
    return error_response(exc, request.scope)


def unexpected_error_response(request: Request, exc: Exception) -> Response:
    """A bug (ours, or in a user's hook): the same error shape and a request id for the
    client, the traceback in the log."""
    logger.error("request %s failed unexpectedly", request_id_of(request.scope), exc_info=exc)
    return error_response(InferenceError("internal error"), request.scope)


async def on_unexpected_error(request: Request, exc: Exception) -> Response:
    """FastAPI's handler for a bug. Starlette re-raises it afterwards, so the server's log
    has it too."""
    response = unexpected_error_response(request, exc)
    # This answer leaves from outside the middleware that adds the header to all others.
    response.headers["x-request-id"] = request_id_of(request.scope)
    return response


async def on_http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (404, 405) in the same shape as ours."""
    assert isinstance(exc, HTTPException)
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":  # no route: say which, and where to look
        message = f"no route {request.method} {request.url.path} (the routes are listed at /docs)"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    body = {"error": message, "request_id": request_id_of(request.scope)}
    return json_response(body, exc.status_code, dict(exc.headers or {}))


async def on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(InvalidInput(str(exc.errors())), request.scope)


_BODY_HEADERS = frozenset({b"content-type", b"content-encoding", b"content-length"})


async def read_body(request: Request, limit: int, *, binary: bool = False) -> bytes:
    """The raw body, refused with 415 unless JSON and with 413 past `limit`, before parsing.

    `binary` also admits application/octet-stream (the protocol's binary tensor extension).
    """
    # One pass over the raw headers and straight calls of receive(): Starlette's header
    # mapping and body stream cost several times more on every request. The first of each
    # header counts, as `header` reads it.
    found: dict[bytes, bytes] = {}
    for key, value in request.scope["headers"]:
        if key in _BODY_HEADERS and key not in found:
            found[key] = value
    content_type = found.get(b"content-type", b"application/json").decode("latin-1")
    media_type = content_type.split(";", 1)[0].strip().lower()
    json_like = media_type == "application/json" or media_type.endswith("+json")
    if not json_like and not (binary and media_type == "application/octet-stream"):
        raise UnsupportedMediaType(
            f"send the body as application/json, not {media_type!r} "
            "(with curl: -H 'content-type: application/json'; -d alone sends a form type)"
        )
    encoding = found.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
    if encoding not in _DECODERS:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported: send identity, gzip or deflate"
        )
    declared = found.get(b"content-length", b"").decode("latin-1")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}")
    body = await _receive_body(request.receive, limit)
    if encoding != "identity":
        body = _decoded(body, encoding, limit)
    if not body:
        raise InvalidInput("the request body is empty")
    return body


async def received_body(request: Request, limit: int, binary: bool = False) -> Received[bytes]:
    """A request's body (`read_body`) with the deadline and the priority its client asked for
    in headers, as the core's request path receives a payload."""
    timeout_s, priority = asked(request)
    body = await read_body(request, limit, binary=binary)
    return Received(body, timeout_s, len(body), priority)


def header(request: Request, name: bytes) -> str | None:
    """The first value of the header `name` (lower case, as ASGI gives names), or None."""
    for key, value in request.scope["headers"]:
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


async def _receive_body(receive: Receive, limit: int) -> bytes:
    """The body's chunks joined, bounded by `limit` as they arrive (a chunked body declares no
    length)."""
    message = await receive()
    first = b""
    chunks: list[bytes] | None = None
    size = 0
    while True:
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected while sending its body")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
        if chunks is not None:
            chunks.append(chunk)
        elif first:
            chunks = [first, chunk]
        else:
            first = chunk
        if not message.get("more_body", False):
            return first if chunks is None else b"".join(chunks)
        message = await receive()


# zlib's window bits for each Content-Encoding: gzip's header, or zlib's (deflate as HTTP
# means it); identity is read as it is.
_DECODERS = {
    "identity": 0,
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}


def _decoded(body: bytes, encoding: str, limit: int) -> bytes:
    """A compressed body, inflated to at most `limit` bytes: the limit applies to what the
    body becomes, so a small bomb cannot unpack into gigabytes."""
    inflater = zlib.decompressobj(_DECODERS[encoding])
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"the body is not valid {encoding}: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"the body inflates past the limit of {limit} bytes")
    if not inflater.eof:
        raise InvalidInput(f"the body is not valid {encoding}: it ends before its stream does")
    return data


def asked(request: Request) -> tuple[float | None, int | None]:
    """What the client asks for in headers: its deadline (X-Request-Timeout-Ms, in seconds)
    and its priority (X-Priority: 1 the highest); None for either not asked. One pass over
    the headers, the first of each counting."""
    timeout = priority = None
    for key, value in request.scope["headers"]:
        if key == b"x-request-timeout-ms":
            timeout = value.decode("latin-1") if timeout is None else timeout
        elif key == b"x-priority":
            priority = value.decode("latin-1") if priority is None else priority
    timeout_s = None
    if timeout is not None:
        # Plain digits only: int() would also take "+100", "1_000", " 100" and other
        # scripts' digits.
        timeout_s = int(timeout) / 1000.0 if timeout.isascii() and timeout.isdigit() else 0.0
        if timeout_s <= 0:
            raise InvalidInput(f"X-Request-Timeout-Ms must be a positive integer, not {timeout!r}")
    if priority is None:
        return timeout_s, None
    if not (priority.isascii() and priority.isdigit()):
        raise InvalidInput(f"X-Priority must be a whole number, 1 the highest, not {priority!r}")
    return timeout_s, int(priority)


class HangUp:
    """Told by gpuserve's HTTP protocol (`connections.py`) when the client of the request in
    progress hangs up: a scope extension, so that a request need not keep a task of its own
    waiting on `receive()` to learn it."""

    KEY = "gpuserve.hangup"
    __slots__ = ("callbacks", "gone")

    def __init__(self) -> None:
        self.gone = False
        self.callbacks: list[Callable[[], None]] = []

    def hung_up(self) -> None:
        self.gone = True
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback()


async def unless_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """Await `work`, but cancel it if the client hangs up first.

    Cancelling drops the request's instances from the queue, so no forward pass is spent on an
    answer nobody will read. Starlette does not do this on its own for plain responses. Under
    gpuserve's own HTTP protocol the protocol says so (`HangUp`); elsewhere (another server,
    tests in-process) one watcher task per request waits for the disconnect message.
    """
    me = asyncio.current_task()
    assert me is not None
    finished = False
    hangup: HangUp | None = request.scope.get("extensions", {}).get(HangUp.KEY)
    watcher: asyncio.Future[None] | None = None

    def cancel_me() -> None:
        if not finished:
            me.cancel()

    if hangup is not None:
        if hangup.gone:
            raise ClientDisconnected("the client disconnected before its result was ready")
        hangup.callbacks.append(cancel_me)
    else:

        def watched(done: asyncio.Future[None]) -> None:
            if not done.cancelled():
                cancel_me()

        watcher = asyncio.ensure_future(_disconnect(request.receive))
        watcher.add_done_callback(watched)
    try:
        return await work
    except asyncio.CancelledError:
        if hangup is not None:
            hung_up = hangup.gone
        else:
            assert watcher is not None
            hung_up = watcher.done() and not watcher.cancelled()
        if not hung_up:
            raise  # cancelled from outside (shutdown), not by the hang-up
        me.uncancel()
        raise ClientDisconnected("the client disconnected before its result was ready") from None
    finally:
        finished = True
        if watcher is not None:
            watcher.cancel()
        elif hangup is not None and cancel_me in hangup.callbacks:
            hangup.callbacks.remove(cancel_me)


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# Responses at least this large are compressed for a client that accepts gzip; smaller ones
# gain less than the header and the CPU cost.
_GZIP_MIN_BYTES = 1024
_GZIP_LEVEL = 1  # the event loop pays for it: the fastest level (JSON numbers shrink ~3x)
_COMPRESSIBLE = (b"application/json", b"text/")


def accepts_gzip(accept_encoding: bytes) -> bool:
    """Whether an Accept-Encoding header admits gzip (by name or `*`, and not at q=0)."""
    for part in accept_encoding.split(b","):
        coding, *params = part.split(b";")
        if coding.strip().lower() not in (b"gzip", b"x-gzip", b"*"):
            continue
        for param in params:
            key, _, value = param.strip().partition(b"=")
            if key.strip().lower() == b"q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


def gzipped(send: Send) -> Send:
    """`send`, compressing a whole JSON or text body of `_GZIP_MIN_BYTES` or more with gzip
    (a streamed or already encoded body passes as it is)."""
    started: Message | None = None

    async def send_gzipped(message: Message) -> None:
        nonlocal started
        if message["type"] == "http.response.start":
            started = message  # held until the body says whether to compress
            return
        if started is None or message["type"] != "http.response.body":
            await send(message)
            return
        start, started = started, None
        body = message.get("body", b"")
        headers = list(start.get("headers", ()))
        if not message.get("more_body") and len(body) >= _GZIP_MIN_BYTES and _compressible(headers):
            compressor = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            body = compressor.compress(body) + compressor.flush()
            headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
            headers += [
                (b"content-encoding", b"gzip"),
                (b"content-length", str(len(body)).encode()),
                (b"vary", b"Accept-Encoding"),
            ]
            message = {**message, "body": body}
        await send({**start, "headers": headers})
        await send(message)

    return send_gzipped


def _compressible(headers: list[tuple[bytes, bytes]]) -> bool:
    kind = b""
    for key, value in headers:
        name = key.lower()
        if name == b"content-encoding":
            return False
        if name == b"content-type":
            kind = value.lower()
    return kind.startswith(_COMPRESSIBLE)
