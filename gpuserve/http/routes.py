"""gpuserve's own routes: health, `/predict` (default model), `/models/...`, `/info`, `/metrics`.

`/predict` reads: read the body -> parse it natively (pydantic-core) -> check each instance
against the spec as one numpy block -> `ModelService.predict` -> encode with orjson.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable
from typing import Any

import fastapi
from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse, Response

from gpuserve.config import Settings
from gpuserve.core.calls import Answer, Call, RequestPath
from gpuserve.core.metrics import Metrics
from gpuserve.core.registry import ModelRegistry
from gpuserve.core.service import ModelService
from gpuserve.http.responses import json_response, received_body, unless_disconnected
from gpuserve.protocols.predict import PredictBody, decode_predict
from gpuserve.protocols.schemas import ErrorResponse, PredictRequest, PredictResponse
from gpuserve.spec import ModelSpec
from gpuserve.version import __version__

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 413, 415, 422, 500, 503, 504)
}
# A model named in the path may not exist; the default model always does.
_NAMED_ERRORS = {**_ERRORS, 404: {"model": ErrorResponse}}
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
    }
}


def _models(request: Request) -> ModelRegistry:
    models: ModelRegistry = request.app.state.models
    return models


@router.get("/health/live")
async def live() -> Response:
    """200 as long as the process serves HTTP, from the first moment, loading or not."""
    return json_response({"status": "alive"})


@router.get("/")
async def root_live() -> Response:
    """Liveness where KServe's v1 clients look for it (`is_server_live`): as /health/live."""
    return json_response({"status": "alive"})


@router.get(
    "/health/ready",
    responses={503: {"description": "loading, failed or stopping, with each model's state"}},
)
async def ready(request: Request) -> Response:
    """200 once no model is loading and at least one is ready; each model's state is listed."""
    body = _models(request).readiness()
    return json_response(body, 200 if body["status"] == "ready" else 503)


@router.post(
    "/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=_PREDICT_BODY
)
async def predict(request: Request) -> Response:
    """Run one instance (`inputs`) or several (`instances`) through the default model."""
    return await predict_with(request, None)


@router.post(
    "/models/{name}/predict",
    response_model=PredictResponse,
    responses=_NAMED_ERRORS,
    openapi_extra=_PREDICT_BODY,
)
async def predict_model(request: Request, name: str) -> Response:
    """`/predict` for any of the served models, by name."""
    return await predict_with(request, name)


async def predict_with(request: Request, model: str | None) -> Response:
    """`/predict` for `model` (None: the default), here and in the fast lane."""
    answer = await run_predict(request, model, decode_predict)
    outputs = answer.rows
    single = answer.decoded.single
    return json_response({"model": answer.spec.name, "outputs": outputs[0] if single else outputs})


async def run_predict(
    request: Request, model: str | None, decode: Callable[[bytes, ModelSpec, int], PredictBody]
) -> Answer[PredictBody]:
    """The core's request path for a JSON-instances protocol (`/predict`, KServe v1): the
    body, decoded by `decode`, through `model`."""
    settings: Settings = request.app.state.settings
    receive = functools.partial(received_body, request, settings.max_body_bytes)
    path: RequestPath = request.app.state.path
    wait = functools.partial(unless_disconnected, request)
    return await path.infer(Call(model), request.state.call, receive, decode, wait)


@router.get("/models")
async def list_models(request: Request) -> Response:
    """Every served model version with its state; the first is the default."""
    models = _models(request)
    return json_response(
        {"default": models.default_name, "models": [_describe_model(s) for s in models]}
    )


@router.get("/models/{name}", responses={404: {"model": ErrorResponse}})
async def model_info(request: Request, name: str) -> Response:
    """One model: its spec, state, device and batching."""
    return json_response(_describe_model(_models(request).get(name)))


@router.get("/info")
async def info(request: Request) -> Response:
    """The default model (as `/models/{name}`), every model's name, and the versions in use."""
    models = _models(request)
    default = models.default
    body = {
        **_describe_model(default),
        "models": list(dict.fromkeys(service.name for service in models)),
        "versions": {
            "gpuserve": __version__,
            "python": platform.python_version(),
            "fastapi": fastapi.__version__,
            "torch": default.device.torch_version if default.device else None,
        },
    }
    return json_response(body)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=registry.content_type)


def _describe_model(service: ModelService) -> dict[str, Any]:
    settings = service.settings
    model = service.model
    return {
        "name": service.name,
        "version": service.version,
        "model": model.spec.model_dump(mode="json") if model else None,
        "state": service.readiness(),
        "device": service.device.to_dict() if service.device else None,
        "devices": [device.device for device in service.devices],
        "copies": service.batcher.workers if service.batcher else 0,
        "batching": {
            "max_batch_size": settings.max_batch_size,
            "effective_max_batch_size": service.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            # False where a CPU model's passes fill the loop's cores (see MicroBatcher.overlap).
            "early_handover": service.batcher.overlap if service.batcher else None,
            "max_instances_per_request": settings.max_instances_per_request,
            "length_buckets": settings.length_buckets,
        },
    }
