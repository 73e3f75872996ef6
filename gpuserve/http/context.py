"""Pure ASGI middleware around every request: its id, the API key check, and its metrics.

Pure ASGI rather than a Starlette BaseHTTPMiddleware: no extra task and no body buffering per
request, which on a small model is a visible share of the request's CPU time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpuserve.core.batcher import Trace
from gpuserve.core.errors import InferenceError, NotReady, Unauthorized
from gpuserve.core.metrics import Metrics
from gpuserve.http.responses import error_response
from gpuserve.logs import access

# Probes must work without a key: Kubernetes and load balancers carry none.
_OPEN_PATHS = frozenset(
    {"/", "/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"}
)
# A random prefix per process and a counter: unique like uuid4, without a syscall per request.
_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count(1)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

logger = logging.getLogger("gpuserve.http")
# A request's `model` in its state is (name, version); these for one that reached no model.
NO_MODEL = ("", "")


class RequestContext:
    """Pure ASGI middleware: a request id, the API key check, each request's metrics and its
    access log line."""

    def __init__(
        self, app: ASGIApp, metrics: Metrics, api_keys: list[str], access_log: bool = True
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.api_keys = [key.encode() for key in api_keys]
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        status = 0  # no response started yet
        started = time.perf_counter()
        self.metrics.in_flight.inc()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            if self.api_keys and not self._authorised(scope):
                refusal = Unauthorized("a valid API key is required")
                await error_response(refusal, request_id)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when its graceful stop runs out of time:
            # the client gets the error shape, not uvicorn's text/plain 500.
            if not status:
                stopping = NotReady("the server is stopping; retry on another replica")
                with contextlib.suppress(Exception):
                    await error_response(stopping, request_id)(scope, receive, send_with_id)
            raise
        except BaseException as exc:
            # The last line of defence: whatever escaped the app (a BaseException from a
            # user's code, a bug) is answered in the error shape, and the server carries on.
            if status:
                raise
            logger.error("request %s failed unexpectedly", request_id, exc_info=exc)
            failure = InferenceError("internal error")
            await error_response(failure, request_id)(scope, receive, send_with_id)
        finally:
            status = status or 500
            self.metrics.in_flight.dec()
            path = _route_label(scope)
            seconds = time.perf_counter() - started
            model, version = state.get("model", NO_MODEL)
            self.metrics.observe_request(path, status, seconds, model, "http", version)
            if self.access_log and access.isEnabledFor(logging.INFO):
                log_request(scope["method"], scope["path"], state, status, seconds)

    def _authorised(self, scope: Scope) -> bool:
        if scope["path"] in _OPEN_PATHS:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                return authorised(value, self.api_keys)
        return False


def authorised(authorization: bytes, keys: list[bytes]) -> bool:
    """Whether an Authorization value ("Bearer <key>") carries one of `keys`: HTTP's header,
    and gRPC's `authorization` metadata."""
    presented = authorization[7:].strip() if authorization[:7].lower() == b"bearer " else b""
    # Compare against every key, in constant time, so timing reveals neither key nor match.
    matches = [hmac.compare_digest(presented, key) for key in keys]
    return any(matches)


def _route_label(scope: Scope) -> str:
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


def log_request(
    method: str, path: str, state: dict[str, Any], status: int | str, seconds: float
) -> None:
    """The access log line of one request, HTTP (status a code) or gRPC (a status name)."""
    fields: dict[str, Any] = {
        "request_id": state["request_id"],
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
    }
    model_version: tuple[str, str] | None = state.get("model")
    trace: Trace | None = state.get("trace")
    detail = ""
    if model_version is not None:
        model, version = model_version
        fields["model"] = model
        detail = f" model={model}"
        if version:
            fields["version"] = version
            detail += f" version={version}"
    if trace is not None and trace.batches:
        fields["batch_size"] = trace.batch_size
        fields["queue_ms"] = round(trace.queue_wait_s * 1000, 3)
        fields["forward_ms"] = round(trace.forward_s * 1000, 3)
        detail += (
            f" batch={trace.batch_size} queue={fields['queue_ms']:.1f}ms"
            f" forward={fields['forward_ms']:.1f}ms"
        )
    access.info(
        "%s %s %s %.1fms id=%s%s",
        method,
        path,
        status,
        seconds * 1000,
        state["request_id"],
        detail,
        extra=fields,
    )


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            return request_id_from(value.decode("latin-1"))
    return new_request_id()


def request_id_from(candidate: str | None) -> str:
    """The id a client sent (X-Request-Id, or gRPC's x-request-id metadata) when it is a
    plain one that logs can carry; a fresh one otherwise."""
    if candidate is not None and _REQUEST_ID.match(candidate):
        return candidate
    return new_request_id()


def new_request_id() -> str:
    """A fresh id for a request that brought none of its own."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"
