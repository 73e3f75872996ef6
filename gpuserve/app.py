"""The HTTP layer: routes, the lifespan that starts the model load, and the one map from errors
to responses. `/predict` reads: parse the body -> validate each instance against the spec ->
`ModelService.predict` (batcher -> worker thread) -> encode the outputs.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import itertools
import logging
import platform
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import fastapi
import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpuserve import __version__
from gpuserve.config import Settings
from gpuserve.errors import (
    ClientDisconnected,
    GpuserveError,
    InvalidInput,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from gpuserve.loading import load_model
from gpuserve.metrics import Metrics
from gpuserve.schemas import ErrorResponse, PredictRequest, PredictResponse
from gpuserve.service import Instance, Loader, ModelService
from gpuserve.spec import to_array, to_arrays

logger = logging.getLogger("gpuserve.app")

router = APIRouter()
# Probes must work without a key: Kubernetes and load balancers carry none.
_OPEN_PATHS = frozenset({"/health/live", "/health/ready"})
# A random prefix per process and a counter: unique like uuid4, without a syscall per request.
_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count(1)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 413, 415, 422, 500, 503, 504)
}


def create_app(settings: Settings, *, loader: Loader | None = None) -> FastAPI:
    """Build the ASGI app. The model starts loading when the app's lifespan starts."""
    metrics = Metrics()
    service = ModelService(settings.model, settings.device, loader or load_model, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="gpuserve", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics
    app.include_router(router)
    app.add_exception_handler(GpuserveError, _gpuserve_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(RequestContext, metrics=metrics, api_keys=settings.api_keys)
    app.openapi = functools.partial(_openapi, app, app.openapi)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI, default: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The OpenAPI document, with /predict's body described by the loaded model's own spec.

    Until the model has loaded the body is described loosely, and the document is not cached.
    """
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = default()
    service: ModelService = app.state.service
    if service.model is None:
        app.openapi_schema = None
        return document
    instance = service.model.spec.input.json_schema()
    limit = service.settings.max_instances_per_request
    body = document["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    body["schema"] = {
        "oneOf": [
            {
                "type": "object",
                "properties": {"inputs": instance},
                "required": ["inputs"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {
                    "instances": {
                        "type": "array",
                        "items": instance,
                        "minItems": 1,
                        "maxItems": limit,
                    }
                },
                "required": ["instances"],
                "additionalProperties": False,
            },
        ]
    }
    return document


class RequestContext:
    """Pure ASGI middleware: a request id, the API key check, and each request's metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics, api_keys: list[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.api_keys = [key.encode() for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        status = 500
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
                await _error_response(refusal, request_id)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.observe_request(path, status, time.perf_counter() - started)

    def _authorised(self, scope: Scope) -> bool:
        if scope["path"] in _OPEN_PATHS:
            return True
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                presented = value[7:].strip()
                break
        # Compare against every key, in constant time, so timing reveals neither key nor match.
        matches = [hmac.compare_digest(presented, key) for key in self.api_keys]
        return any(matches)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID.match(candidate):
                return candidate
            break
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def _service(request: Request) -> ModelService:
    service: ModelService = request.app.state.service
    return service


def _json(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


@router.get("/health/live")
async def live() -> Response:
    """200 as long as the process serves HTTP, from the first moment, loading or not."""
    return _json({"status": "alive"})


@router.get(
    "/health/ready",
    responses={503: {"description": "loading, failed or stopping, with a reason"}},
)
async def ready(request: Request) -> Response:
    """200 once the model is on its device and warmed up; 503 with the state otherwise."""
    body = _service(request).readiness()
    return _json(body, 200 if body["status"] == "ready" else 503)


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
        }
    },
)
async def predict(request: Request) -> Response:
    """Run one instance (`inputs`) or several (`instances`) through the model."""
    service = _service(request)
    spec = service.spec  # NotReady (503) while loading, before the body is read
    timeout_s = _timeout(request, service.settings.request_timeout_s)
    body = await _body(request)
    try:
        parsed = PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidInput(_describe(exc)) from None

    if parsed.instances is not None:
        limit = service.settings.max_instances_per_request
        if len(parsed.instances) > limit:
            raise InvalidInput(f"instances: {len(parsed.instances)} given, at most {limit} allowed")
        arrays: list[Instance] = to_arrays(parsed.instances, spec.input, "instances")
    else:
        arrays = [to_array(parsed.inputs, spec.input, "inputs")]
    outputs = await _unless_disconnected(request, service.predict(arrays, timeout_s))
    single = parsed.instances is None
    return _json({"model": spec.name, "outputs": outputs[0] if single else outputs})


async def _body(request: Request) -> bytes:
    """The raw body, refused with 415 unless JSON and with 413 past the limit, before parsing."""
    content_type = request.headers.get("content-type", "application/json")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(f"send the body as application/json, not {media_type!r}")
    settings: Settings = request.app.state.settings
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():  # also bounds chunked bodies that declare no length
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise InvalidInput("the request body is empty: send JSON with 'inputs' or 'instances'")
    return body


def _timeout(request: Request, default_s: float) -> float:
    """The request's deadline: the setting, or less if the client asks for less."""
    header = request.headers.get("x-request-timeout-ms")
    if header is None:
        return default_s
    try:
        asked_s = int(header) / 1000.0
    except ValueError:
        asked_s = 0.0
    if asked_s <= 0:
        raise InvalidInput(f"X-Request-Timeout-Ms must be a positive integer, not {header!r}")
    return min(asked_s, default_s)


async def _unless_disconnected(request: Request, work: Awaitable[list[Any]]) -> list[Any]:
    """Await `work`, but cancel it if the client hangs up first.

    Cancelling drops the request's instances from the queue, so no forward pass is spent on an
    answer nobody will read. Starlette does not do this on its own for plain responses. A done
    callback, rather than asyncio.wait, keeps this to one extra task per request.
    """
    me = asyncio.current_task()
    assert me is not None
    finished = False

    def hung_up(watcher: asyncio.Future[None]) -> None:
        if not finished and not watcher.cancelled():
            me.cancel()

    watcher = asyncio.ensure_future(_disconnect(request.receive))
    watcher.add_done_callback(hung_up)
    try:
        return await work
    except asyncio.CancelledError:
        if watcher.cancelled() or not watcher.done():
            raise  # cancelled from outside (shutdown), not by the hang-up
        me.uncancel()
        raise ClientDisconnected("the client disconnected before its result was ready") from None
    finally:
        finished = True
        watcher.cancel()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@router.get("/info")
async def info(request: Request) -> Response:
    """The model, its spec, the device, the batcher settings and the versions in use."""
    service = _service(request)
    settings: Settings = request.app.state.settings
    model = service.model
    body = {
        "model": model.spec.model_dump(mode="json") if model else None,
        "state": service.readiness(),
        "device": service.device.to_dict() if service.device else None,
        "batching": {
            "max_batch_size": settings.model.max_batch_size,
            "effective_max_batch_size": service.max_batch_size,
            "max_wait_ms": settings.model.max_wait_ms,
            "max_instances_per_request": settings.model.max_instances_per_request,
        },
        "versions": {
            "gpuserve": __version__,
            "python": platform.python_version(),
            "fastapi": fastapi.__version__,
            "torch": service.device.torch_version if service.device else None,
        },
    }
    return _json(body)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=registry.content_type)


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def _error_response(exc: GpuserveError, request_id: str) -> Response:
    """The one place an error becomes a response: its status, message, request id, headers."""
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return _json({"error": exc.message, "request_id": request_id}, exc.status_code, headers)


def _request_id_of(request: Request) -> str:
    request_id: str = request.scope.get("state", {}).get("request_id", "")
    return request_id


async def _gpuserve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GpuserveError)
    if exc.status_code == 500:
        cause = exc.__cause__ or exc
        logger.error("request %s failed: %s", _request_id_of(request), exc.message, exc_info=cause)
    return _error_response(exc, _request_id_of(request))


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (404, 405) in the same shape as ours."""
    assert isinstance(exc, HTTPException)
    body = {"error": str(exc.detail), "request_id": _request_id_of(request)}
    return _json(body, exc.status_code, dict(exc.headers or {}))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return _error_response(InvalidInput(str(exc.errors())), _request_id_of(request))
