"""The Open Inference Protocol (KServe v2) routes, so Triton's and KServe's clients work as is.

The routes are thin: `oip` decodes and encodes, and inference goes through the same
`ModelService.predict`, hence the same batcher, as `/predict`. Input errors answer 400, as the
protocol has it, in the same `{"error": ...}` shape as every other error.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gpuserve.config import Settings
from gpuserve.core.batcher import Trace
from gpuserve.core.errors import BadRequest, InvalidInput
from gpuserve.core.registry import ModelRegistry
from gpuserve.core.service import ModelService
from gpuserve.http.responses import (
    JSON,
    deadline_s,
    json_response,
    read_body,
    request_id_of,
    unless_disconnected,
)
from gpuserve.protocols import oip
from gpuserve.protocols.predict import BodyDecoder
from gpuserve.protocols.schemas import ErrorResponse
from gpuserve.version import __version__

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


def _models(request: Request) -> ModelRegistry:
    models: ModelRegistry = request.app.state.models
    return models


def _service(request: Request, name: str, version: str | None) -> ModelService:
    return _models(request).get(name, version)


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
    return json_response({"model_stats": statistics_of(_models(request), None, None)})


@router.get("/models/{name}/stats", responses=_READY_ERRORS)
async def model_statistics(request: Request, name: str) -> Response:
    """One model's statistics, each loaded version's: requests that succeeded and failed,
    queue and compute time, batches by size. The same observations as /metrics."""
    return json_response({"model_stats": statistics_of(_models(request), name, None)})


@router.get("/models/{name}/versions/{version}/stats", include_in_schema=False)
async def version_statistics(request: Request, name: str, version: str) -> Response:
    return json_response({"model_stats": statistics_of(_models(request), name, version)})


def statistics_of(
    models: ModelRegistry, name: str | None, version: str | None
) -> list[dict[str, Any]]:
    """Statistics in Triton's form (HTTP's and gRPC's): of one version; with `version` None,
    of each loaded version of `name`; with `name` None too, of every loaded model."""
    if name is None:
        services = list(models)
    else:
        services = [models.get(name, version)] if version else models.all_versions(name)
    summed = models.metrics.summed_stats([service.labels for service in services])
    return [
        stats.to_triton(service.name, service.version)
        for service, stats in zip(services, summed, strict=True)
    ]


@router.get("/models/{name}", responses=_METADATA_ERRORS)
async def model_metadata(request: Request, name: str) -> Response:
    """Name, versions loaded, platform, and the input and output tensors (batch dimension
    -1), of the version the model's routes without a version serve."""
    return json_response(metadata_of(_models(request), name, None))


@router.get("/models/{name}/versions/{version}", include_in_schema=False)
async def version_metadata(request: Request, name: str, version: str) -> Response:
    return json_response(metadata_of(_models(request), name, version))


def metadata_of(models: ModelRegistry, name: str, version: str | None) -> dict[str, Any]:
    """A model version's metadata (HTTP's and gRPC's)."""
    return oip.metadata(models.get(name, version).spec, PLATFORM, models.versions(name))


@router.get("/models/{name}/config", responses=_METADATA_ERRORS)
async def model_config(request: Request, name: str) -> Response:
    """The model's configuration in Triton's form: tensors, batching, copies on devices."""
    return json_response(model_config_of(_models(request), name, None))


@router.get("/models/{name}/versions/{version}/config", include_in_schema=False)
async def version_config(request: Request, name: str, version: str) -> Response:
    return json_response(model_config_of(_models(request), name, version))


def model_config_of(models: ModelRegistry, name: str, version: str | None) -> dict[str, Any]:
    """A served model's configuration in Triton's form (HTTP's and gRPC's)."""
    service = models.get(name, version)
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
        versions=models.versions(name),
    )


@router.get("/models/{name}/ready", responses={**_READY_ERRORS, **_NOT_READY})
async def model_ready(request: Request, name: str) -> Response:
    """200 when the model is ready; 400 while it loads, after it failed, or while stopping."""
    return _readiness(_service(request, name, None), name)


@router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
async def version_ready(request: Request, name: str, version: str) -> Response:
    return _readiness(_service(request, name, version), name)


def _readiness(service: ModelService, name: str) -> Response:
    ready = service.state == "ready"
    return json_response({"name": name, "ready": ready}, 200 if ready else 400)


@router.post("/models/{name}/infer", responses=_ERRORS, openapi_extra=_INFER_BODY)
async def infer(request: Request, name: str) -> Response:
    """Inference with JSON tensors, or with the binary tensor data extension."""
    return await infer_version(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", include_in_schema=False)
async def version_infer(request: Request, name: str, version: str) -> Response:
    return await infer_version(request, name, version)


async def infer_version(request: Request, name: str, version: str | None) -> Response:
    """Inference on one version of a model, or (`version` None) on the one its routes
    without a version serve."""
    models = _models(request)
    service = models.get(name, version)
    request.state.model = service.labels
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
    if service.retired:  # since the request found it: reloaded, or its version unloaded
        service = models.current(service, version, spec)
        request.state.model = service.labels
    rows = await unless_disconnected(
        request, service.predict(decoded.instances, timeout_s, postprocess=False, trace=trace)
    )
    # The client's id, or the request's own (X-Request-Id, in the logs too) when it sent none.
    response_id = decoded.id if decoded.id is not None else request_id_of(request)
    content, json_length = oip.encode_response(
        spec, rows, response_id, decoded.outputs, service.version
    )
    if json_length is None:
        return JSON(content)
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(json_length)},
    )
