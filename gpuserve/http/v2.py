"""The Open Inference Protocol (KServe v2) routes, so Triton's and KServe's clients work as is.

The routes are thin: `oip` decodes and encodes, `oip_reads` answers what the protocol reads,
and inference takes the core's one request path (`RequestPath.infer`), as every protocol
does. Input errors answer 400, as the protocol has it (`protocols.status`), in the same
`{"error": ...}` shape as every other error.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gpuserve.config import Settings
from gpuserve.core.calls import Call, RequestPath
from gpuserve.core.errors import NotReady, NotServed
from gpuserve.core.registry import ModelRegistry
from gpuserve.http.responses import (
    JSON,
    header,
    json_response,
    received_body,
    unless_disconnected,
)
from gpuserve.protocols import oip
from gpuserve.protocols import oip_reads as reads
from gpuserve.protocols.schemas import ErrorResponse

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])
_HEADER_LENGTH = oip.HEADER_LENGTH.encode()

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


def _models(request: Request) -> ModelRegistry:
    models: ModelRegistry = request.app.state.models
    return models


@router.get("")
async def server_metadata(request: Request) -> Response:
    """The server's name, version and protocol extensions."""
    return json_response(reads.server_metadata(request.app.state.settings))


@router.get("/health/live")
async def server_live() -> Response:
    """200 while the process serves HTTP."""
    return json_response({"live": True})


@router.get("/health/ready", responses=_NOT_READY)
async def server_ready(request: Request) -> Response:
    """200 when the server is ready (see /health/ready); 400 otherwise."""
    ready = reads.server_ready(_models(request))
    return json_response({"ready": ready}, 200 if ready else 400)


# Before /models/{name}: "stats" is this route, not a model's name.
@router.get("/models/stats", responses={401: {"model": ErrorResponse}})
async def all_statistics(request: Request) -> Response:
    """Every model's statistics in Triton's form (the statistics extension)."""
    return json_response({"model_stats": reads.statistics_of(_models(request), None, None)})


@router.get("/models/{name}/stats", responses=_READY_ERRORS)
async def model_statistics(request: Request, name: str) -> Response:
    """One model's statistics, each loaded version's: requests that succeeded and failed,
    queue and compute time, batches by size. The same observations as /metrics."""
    return json_response({"model_stats": reads.statistics_of(_models(request), name, None)})


@router.get("/models/{name}/versions/{version}/stats", include_in_schema=False)
async def version_statistics(request: Request, name: str, version: str) -> Response:
    return json_response({"model_stats": reads.statistics_of(_models(request), name, version)})


@router.get("/models/{name}", responses=_METADATA_ERRORS)
async def model_metadata(request: Request, name: str) -> Response:
    """Name, versions loaded, platform, and the input and output tensors (batch dimension
    -1), of the version the model's routes without a version serve."""
    return json_response(reads.metadata_of(_models(request), name, None))


@router.get("/models/{name}/versions/{version}", include_in_schema=False)
async def version_metadata(request: Request, name: str, version: str) -> Response:
    return json_response(reads.metadata_of(_models(request), name, version))


@router.get("/models/{name}/config", responses=_METADATA_ERRORS)
async def model_config(request: Request, name: str) -> Response:
    """The model's configuration in Triton's form: tensors, batching, copies on devices."""
    return json_response(reads.model_config_of(_models(request), name, None))


@router.get("/models/{name}/versions/{version}/config", include_in_schema=False)
async def version_config(request: Request, name: str, version: str) -> Response:
    return json_response(reads.model_config_of(_models(request), name, version))


@router.get("/models/{name}/ready", responses={**_READY_ERRORS, **_NOT_READY})
async def model_ready(request: Request, name: str) -> Response:
    """200 when the model is ready; 400 while it loads, after it failed, or while stopping."""
    return _readiness(request, name, None)


@router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
async def version_ready(request: Request, name: str, version: str) -> Response:
    return _readiness(request, name, version)


def _readiness(request: Request, name: str, version: str | None) -> Response:
    models = _models(request)
    with contextlib.suppress(NotReady):  # unloaded: not ready (400), as the protocol says
        models.get(name, version)  # a name or version never known: 404, with the names
    ready = reads.model_ready(models, name, version)
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
    record = request.state.call
    path: RequestPath = request.app.state.path
    settings: Settings = request.app.state.settings
    receive = functools.partial(received_body, request, settings.max_body_bytes, True)
    decode = functools.partial(oip.decode_request, header_length=header(request, _HEADER_LENGTH))
    answer = await path.infer(
        Call(name, version, postprocess=False),
        record,
        receive,
        decode,
        functools.partial(unless_disconnected, request),
    )
    decoded = answer.decoded
    # The client's id, or the request's own (X-Request-Id, in the logs too) when it sent none.
    response_id = decoded.id if decoded.id is not None else record.request_id
    content, json_length = oip.encode_response(
        answer.spec, answer.rows, response_id, decoded.outputs, answer.service.version
    )
    if json_length is None:
        return JSON(content)
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(json_length)},
    )


def _not_served(what: str) -> Any:
    async def refuse(request: Request) -> Response:
        raise NotServed(f"{what} is not served by gpuserve")

    return refuse


for _path, _what in oip.NOT_SERVED_ROUTES.items():
    router.add_api_route(
        _path, _not_served(_what), methods=["GET", "POST"], include_in_schema=False
    )
