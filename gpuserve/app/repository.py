"""The Open Inference Protocol's repository API: list, load (or reload) and unload models
while serving, as tritonclient's get_model_repository_index, load_model and unload_model do.

Off unless `repository_api` is set; with `api_keys`, it needs a key like every other route.
A model is loaded by name only: a configured one, or `<repository_dir>/<name>.pt2`. Nothing
in a request names a path, a module or a device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gpuserve import oip
from gpuserve.app.responses import json_response
from gpuserve.config import ModelSettings, Settings
from gpuserve.errors import BadRequest, ModelLoadError, ModelNotFound
from gpuserve.registry import ModelRegistry
from gpuserve.schemas import ErrorResponse

router = APIRouter(prefix="/v2/repository", tags=["Open Inference Protocol: repository"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 503)
}
_STATES = {"ready": "READY", "loading": "LOADING"}


def _context(request: Request) -> tuple[ModelRegistry, Settings]:
    # No check of repository_api here: without it, create_app does not mount these routes.
    models: ModelRegistry = request.app.state.models
    settings: Settings = request.app.state.settings
    return models, settings


@router.post("/index", responses=_ERRORS)
async def index(request: Request) -> Response:
    """Every model this server knows: configured, or loaded from the repository folder,
    loaded or not, with its state and, when not ready, the reason."""
    models, _ = _context(request)
    return json_response(index_entries(models))


@router.post("/models/{name}/load", responses=_ERRORS)
async def load(request: Request, name: str) -> Response:
    """Load the model, or reload it (new weights from its configured source) with no
    request failing: the new copy replaces the old once ready."""
    await load_model(*_context(request), name)
    return json_response({})


@router.post("/models/{name}/unload", responses=_ERRORS)
async def unload(request: Request, name: str) -> Response:
    """Stop serving the model: its accepted requests are answered, then its memory freed."""
    models, settings = _context(request)
    await models.unload(name, settings.shutdown_timeout_s)
    return json_response({})


# The operations themselves, which gRPC's repository calls share.


def index_entries(models: ModelRegistry) -> list[dict[str, Any]]:
    """The repository index: each known model's name, version, state and reason."""
    entries = []
    for name in models.configured:
        state, reason = models.state_of(name)
        entry = {"name": name, "version": oip.VERSION, "state": _STATES.get(state, "UNAVAILABLE")}
        if state != "ready" and reason:
            entry["reason"] = reason
        entries.append(entry)
    return entries


async def load_model(models: ModelRegistry, settings: Settings, name: str) -> None:
    """Load or reload a model by name: a configured one, or one in the repository folder."""
    model = models.configured.get(name) or _from_repository(settings.repository_dir, name)
    try:
        await models.load(model, settings.shutdown_timeout_s)
    except ModelLoadError as exc:
        raise BadRequest(f"failed to load {name!r}: {exc.message}") from None


def _from_repository(folder: Path | None, name: str) -> ModelSettings:
    """A model found by name in the repository folder; never a path from the request."""
    unknown = ModelNotFound(f"no model named {name!r} is configured or in the repository")
    try:
        model = ModelSettings(name=name, path=Path(f"{name}.pt2"))  # checks the name's form
    except ValueError:
        raise unknown from None
    if folder is None:
        raise unknown
    root = folder.resolve()
    path = (root / f"{name}.pt2").resolve()
    if path.parent != root or not path.is_file():
        raise unknown
    return model.model_copy(update={"path": path})
