"""KServe's v1 protocol, which KServe's own servers speak by default: list the models, one
model's readiness, and `:predict` with `{"instances": [...]}` answered `{"predictions": [...]}`.

A thin codec, like the others: the body goes through the same shared request path as
`/predict` (`routes.run_predict`), hence the same checks, batcher and errors.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gpuserve.core.errors import NotReady
from gpuserve.core.registry import ModelRegistry
from gpuserve.http.responses import json_response
from gpuserve.http.routes import run_predict
from gpuserve.protocols.predict import decode_v1
from gpuserve.protocols.schemas import ErrorResponse

router = APIRouter(prefix="/v1", tags=["KServe v1"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 404, 413, 415, 422, 500, 503, 504)
}
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"type": "object", "required": [name], "additionalProperties": False}
                        | {"properties": {name: {"type": "array", "minItems": 1}}}
                        for name in ("instances", "inputs")
                    ]
                }
            }
        },
    }
}


def _models(request: Request) -> ModelRegistry:
    models: ModelRegistry = request.app.state.models
    return models


@router.get("/models", responses={401: {"model": ErrorResponse}})
async def list_models(request: Request) -> Response:
    """The names of the served models."""
    names = dict.fromkeys(service.name for service in _models(request))
    return json_response({"models": list(names)})


# Before /models/{name}, whose pattern also matches "digits:predict": a GET or OPTIONS there
# must be told POST is the method, not be read as a model named "digits:predict".
@router.post("/models/{name}:predict", responses=_ERRORS, openapi_extra=_BODY)
async def predict(request: Request, name: str) -> Response:
    """The instances through the model: one prediction per instance, in order."""
    answer = await run_predict(request, name, decode_v1)
    return json_response({"predictions": answer.rows})


@router.get(
    "/models/{name}",
    responses={code: {"model": ErrorResponse} for code in (401, 404, 503)},
)
async def model_ready(request: Request, name: str) -> Response:
    """`{"name", "ready": true}` once the model serves; 503 with the reason until then."""
    service = _models(request).get(name)
    if service.state != "ready":
        raise NotReady(f"model {name!r} is {service.state}", retry_after_s=2)
    return json_response({"name": service.name, "ready": True})
