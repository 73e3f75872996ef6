"""The Open Inference Protocol's repository API: list, load (or reload) and unload models
while serving, as tritonclient's get_model_repository_index, load_model and unload_model do.

Off unless `repository_api` is set; with `api_keys`, it needs a key like every other route.
A model is loaded by name (and version) only: a configured one, or one in `repository_dir`,
`<name>.pt2` (version 1) or `<name>/<version>/model.pt2` (Triton's layout). Nothing in a
request names a path, a module or a device.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gpuserve.config import Settings
from gpuserve.core import repository
from gpuserve.core.errors import InvalidInput
from gpuserve.core.registry import ModelRegistry
from gpuserve.http.responses import json_response
from gpuserve.protocols import oip
from gpuserve.protocols.oip_reads import index_entries
from gpuserve.protocols.schemas import ErrorResponse

router = APIRouter(prefix="/v2/repository", tags=["Open Inference Protocol: repository"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 503)
}


def _context(request: Request) -> tuple[ModelRegistry, Settings]:
    # No check of repository_api here: without it, create_app does not mount these routes.
    models: ModelRegistry = request.app.state.models
    settings: Settings = request.app.state.settings
    return models, settings


# A repository request's body is a few options: anything larger is no such request.
_OPTIONS_LIMIT = 64 * 1024


async def _options(request: Request) -> dict[str, Any]:
    """A repository request's JSON body (absent: no options); InvalidInput (400) if it is not
    a JSON object."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _OPTIONS_LIMIT:
            raise InvalidInput(f"the body is over {_OPTIONS_LIMIT} bytes: send a few options")
    if not body.strip():
        return {}
    return oip.json_object(body, "the body")


@router.post("/index", responses=_ERRORS)
async def index(request: Request) -> Response:
    """Every model this server knows: configured, or in the repository folder, loaded or
    not, with its state and, when not ready, the reason; `{"ready": true}`: the ready ones."""
    models, settings = _context(request)
    ready = (await _options(request)).get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidInput(f"'ready' must be true or false, not {ready!r}")
    on_disk = repository.on_disk(settings.repository_dir)
    return json_response(index_entries(models, on_disk, ready=ready))


@router.post("/models/{name}/load", responses=_ERRORS)
async def load(request: Request, name: str) -> Response:
    """Load the model, every version configured or in the repository folder, or reload it
    (new weights from its source) with no request failing: each new copy replaces the old
    once ready. Load parameters (a config or files to override) are refused, not ignored."""
    await _no_parameters(request)
    await repository.load_model(*_context(request), name)
    return json_response({})


async def _no_parameters(request: Request) -> None:
    parameters = (await _options(request)).get("parameters")
    if parameters:
        names = ", ".join(sorted(map(str, parameters)))[:200]
        raise InvalidInput(f"load parameters are not supported: {names}")


@router.post("/models/{name}/unload", responses=_ERRORS)
async def unload(request: Request, name: str) -> Response:
    """Stop serving the model, every version: accepted requests are answered, then its
    memory is freed."""
    models, settings = _context(request)
    await models.unload(name, settings.shutdown_timeout_s)
    return json_response({})


# gpuserve's extension: one version at a time, the steps of a rollout.


@router.post("/models/{name}/versions/{version}/load", responses=_ERRORS)
async def load_version(request: Request, name: str, version: str) -> Response:
    """Load (or reload) one version, leaving the others serving. Routes without a version
    move to it once it is ready, if it is the highest (see `default_versions`)."""
    await _no_parameters(request)
    await repository.load_model(*_context(request), name, version)
    return json_response({})


@router.post("/models/{name}/versions/{version}/unload", responses=_ERRORS)
async def unload_version(request: Request, name: str, version: str) -> Response:
    """Stop serving one version; routes without a version move to the versions left."""
    models, settings = _context(request)
    await models.unload(name, settings.shutdown_timeout_s, version)
    return json_response({})
