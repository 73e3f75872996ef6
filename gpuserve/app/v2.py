"""The Open Inference Protocol (KServe v2) routes, so Triton's and KServe's clients work as is.

The routes are thin: `oip` decodes and encodes, and inference goes through the same
`ModelService.predict`, hence the same batcher, as `/predict`. Input errors answer 400, as the
protocol has it, in the same `{"error": ...}` shape as every other error.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gpuserve import __version__, oip
from gpuserve.app.responses import (
    JSON,
    deadline_s,
    json_response,
    read_body,
    request_id_of,
    unless_disconnected,
)
from gpuserve.batcher import Trace
from gpuserve.config import Settings
from gpuserve.decoding import BodyDecoder
from gpuserve.errors import BadRequest, InvalidInput, ModelNotFound
from gpuserve.metrics import Metrics
from gpuserve.registry import ModelRegistry
from gpuserve.schemas import ErrorResponse
from gpuserve.service import ModelService

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 500, 503, 504)
}
# A GET reads no body and waits for no model: no 400, 413, 415 or 504; metadata needs the
# loaded spec (503 until then), readiness only the model's state.
_METADATA_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 404, 500, 503)
}
_READY_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 404, 500)
}
_NOT_READY: dict[int | str, dict[str, Any]] = {
    400: {"description": "not ready (the protocol's 4xx for false)"}
}
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
# Platform names are free text in the protocol; clients only display them.
PLATFORM = "pytorch"


def _service(request: Request, name: str) -> ModelService:
    models: ModelRegistry = request.app.state.models
    return models.get(name)


def _check_version(name: str, version: str) -> None:
    if version != oip.VERSION:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; it has {oip.VERSION!r}")


@router.get("")
async def server_metadata(request: Request) -> Response:
    """The server's name, version and protocol extensions."""
    settings: Settings = request.app.state.settings
    extensions = list(oip.EXTENSIONS)
    if settings.repository_api:
        extensions.append(oip.REPOSITORY_EXTENSION)
    return json_response({"name": "gpuserve", "version": __version__, "extensions": extensions})


@router.get("/health/live")
async def server_live() -> Response:
    """200 while the process serves HTTP."""
    return json_response({"live": True})


@router.get("/health/ready", responses=_NOT_READY)
async def server_ready(request: Request) -> Response:
    """200 when the server is ready (see /health/ready); 400 otherwise."""
    models: ModelRegistry = request.app.state.models
    ready = models.status == "ready"
    return json_response({"ready": ready}, 200 if ready else 400)


# Before /models/{name}: "stats" is this route, not a model's name.
@router.get("/models/stats", responses={401: {"model": ErrorResponse}})
async def all_statistics(request: Request) -> Response:
    """Every model's statistics in Triton's form (the statistics extension)."""
    models: ModelRegistry = request.app.state.models
    return json_response({"model_stats": [_statistics(request, s.name) for s in models]})


@router.get("/models/{name}/stats", responses=_READY_ERRORS)
async def model_statistics(request: Request, name: str) -> Response:
    """One model's statistics: requests that succeeded and failed, queue and compute time,
    batches by size. The same observations as /metrics."""
    service = _service(request, name)
    return json_response({"model_stats": [_statistics(request, service.name)]})


def _statistics(request: Request, name: str) -> dict[str, Any]:
    metrics: Metrics = request.app.state.metrics
    return metrics.stats(name).to_triton(name, oip.VERSION)


@router.get("/models/{name}", responses=_METADATA_ERRORS)
async def model_metadata(request: Request, name: str) -> Response:
    """Name, versions, platform, and the input and output tensors (batch dimension -1)."""
    return json_response(oip.metadata(_service(request, name).spec, PLATFORM))


@router.get("/models/{name}/config", responses=_METADATA_ERRORS)
async def model_config(request: Request, name: str) -> Response:
    """The model's configuration in Triton's form: tensors, batching, copies on devices."""
    return json_response(model_config_of(_service(request, name)))


def model_config_of(service: ModelService) -> dict[str, Any]:
    """A served model's configuration in Triton's form (HTTP's and gRPC's)."""
    settings = service.settings
    copies = [
        (device.kind, device.index, settings.instances_per_device) for device in service.devices
    ]
    return oip.model_config(
        service.spec,
        max_batch_size=settings.max_batch_size,
        preferred_batch_size=service.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        copies=copies,
    )


@router.get("/models/{name}/ready", responses={**_READY_ERRORS, **_NOT_READY})
async def model_ready(request: Request, name: str) -> Response:
    """200 when the model is ready; 400 while it loads, after it failed, or while stopping."""
    ready = _service(request, name).state == "ready"
    return json_response({"name": name, "ready": ready}, 200 if ready else 400)


@router.post("/models/{name}/infer", responses=_ERRORS, openapi_extra=_INFER_BODY)
async def infer(request: Request, name: str) -> Response:
    """Inference with JSON tensors, or with the binary tensor data extension."""
    service = _service(request, name)
    request.state.model = service.name
    spec = service.spec  # NotReady (503) while loading, before the body is read
    settings: Settings = request.app.state.settings
    try:
        timeout_s = deadline_s(request, service.settings.request_timeout_s)
        body = await read_body(request, settings.max_body_bytes, binary=True)
    except InvalidInput as exc:
        raise BadRequest(exc.message) from None
    header_length = request.headers.get(oip.HEADER_LENGTH)
    decoder: BodyDecoder = request.app.state.decoder
    limit = service.settings.max_instances_per_request
    decoded = await decoder.run(body, oip.decode_request, header_length, spec, limit)
    if decoded.timeout_s is not None:
        timeout_s = min(timeout_s, decoded.timeout_s)
    trace = request.state.trace = Trace()
    rows = await unless_disconnected(
        request, service.predict(decoded.instances, timeout_s, postprocess=False, trace=trace)
    )
    # The client's id, or the request's own (X-Request-Id, in the logs too) when it sent none.
    response_id = decoded.id if decoded.id is not None else request_id_of(request)
    content, json_length = oip.encode_response(spec, rows, response_id, decoded.outputs)
    if json_length is None:
        return JSON(content)
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(json_length)},
    )


# The same routes under /versions/{version}, which clients use when given a version.


@router.get("/models/{name}/versions/{version}", include_in_schema=False)
async def version_metadata(request: Request, name: str, version: str) -> Response:
    _check_version(name, version)
    return await model_metadata(request, name)


@router.get("/models/{name}/versions/{version}/stats", include_in_schema=False)
async def version_statistics(request: Request, name: str, version: str) -> Response:
    _check_version(name, version)
    return await model_statistics(request, name)


@router.get("/models/{name}/versions/{version}/config", include_in_schema=False)
async def version_config(request: Request, name: str, version: str) -> Response:
    _check_version(name, version)
    return await model_config(request, name)


@router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
async def version_ready(request: Request, name: str, version: str) -> Response:
    _check_version(name, version)
    return await model_ready(request, name)


@router.post("/models/{name}/versions/{version}/infer", include_in_schema=False)
async def version_infer(request: Request, name: str, version: str) -> Response:
    _check_version(name, version)
    return await infer(request, name)
