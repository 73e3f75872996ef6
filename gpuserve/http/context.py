"""Pure ASGI middleware around every request: the core's per-call envelope (its id, the API key
check, its metrics and access log line), and the error shape for whatever escapes the app.

Pure ASGI rather than a Starlette BaseHTTPMiddleware: no extra task and no body buffering per
request, which on a small model is a visible share of the request's CPU time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpuserve.core.envelope import Envelope
from gpuserve.core.errors import InferenceError, NotReady, Unauthorized
from gpuserve.http.responses import CALL, accepts_gzip, error_response, gzipped

# Probes must work without a key: Kubernetes and load balancers carry none.
_OPEN_PATHS = frozenset(
    {"/", "/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"}
)
# What orchestrators and scrapers call every few seconds: their access lines go at DEBUG.
_PROBES = _OPEN_PATHS | {"/metrics"}

# The W3C trace context a client may send, for its call's span when traces are on.
_TRACE_CONTEXT = (b"traceparent", b"tracestate")

logger = logging.getLogger("gpuserve.http")


class RequestContext:
    """Pure ASGI middleware: every HTTP request inside the core's `Envelope`."""

    def __init__(self, app: ASGIApp, envelope: Envelope) -> None:
        self.app = app
        self.envelope = envelope

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        envelope = self.envelope
        offered_id = authorization = parent = None
        for name, value in scope["headers"]:  # one pass, for the headers read here
            if name == b"x-request-id":
                offered_id = value.decode("latin-1")
            elif name == b"authorization":
                authorization = value
            elif name == b"accept-encoding" and accepts_gzip(value):
                send = gzipped(send)
            elif name in _TRACE_CONTEXT:
                parent = parent or {}
                parent[name.decode("latin-1")] = value.decode("latin-1")
        # A trace context is kept only where traces are on: most requests carry none.
        record = envelope.open(offered_id, parent if parent and envelope.tracing else None)
        scope.setdefault("state", {})[CALL] = record
        header = (b"x-request-id", record.request_id.encode())
        status = 0  # no response started yet

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            if envelope.keys and not (
                scope["path"] in _OPEN_PATHS or envelope.admits(authorization)
            ):
                refusal = Unauthorized("a valid API key is required")
                await error_response(refusal, scope)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when its graceful stop runs out of time:
            # the client gets the error shape, not uvicorn's text/plain 500.
            if not status:
                stopping = NotReady("the server is stopping; retry on another replica")
                with contextlib.suppress(Exception):
                    await error_response(stopping, scope)(scope, receive, send_with_id)
            raise
        except BaseException as exc:
            # The last line of defence: whatever escaped the app (a BaseException from a
            # user's code, a bug) is answered in the error shape, and the server carries on.
            if status:
                raise
            logger.error("request %s failed unexpectedly", record.request_id, exc_info=exc)
            failure = InferenceError("internal error")
            await error_response(failure, scope)(scope, receive, send_with_id)
        finally:
            route = route_label(scope)
            path = scope["path"]
            probe = path in _PROBES
            envelope.close(record, scope["method"], path, route, status or 500, probe=probe)


def route_label(scope: Scope) -> str:
    """The route a request matched, as a metrics label: its path template, bounded in number.

    FastAPI's own routes say which route they are; plain Starlette routes (/docs and
    /openapi.json) only leave their endpoint, and as they take no parameters their path is the
    template. A mounted app (the docs' static files) is labelled by where it is mounted, so
    that made-up file names cannot each add a label.
    """
    route = scope.get("route")
    if route is not None:
        return str(getattr(route, "path", "unmatched"))
    if scope.get("endpoint") is not None and not scope.get("path_params"):
        mounted = str(scope.get("root_path", ""))[len(str(scope.get("app_root_path", ""))) :]
        return mounted or str(scope["path"])
    return "unmatched"
