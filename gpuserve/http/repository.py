"""The Open Inference Protocol's repository API: list, load (or reload) and unload models
while serving, as tritonclient's get_model_repository_index, load_model and unload_model do.

Off unless `repository_api` is set; with `api_keys`, it needs a key like every other route.
A model is loaded by name (and version) only: a configured one, or one in `repository_dir`,
`<name>.pt2` (version 1) or `<name>/<version>/model.pt2` (Triton's layout). Nothing in a
request names a path, a module or a device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from gpuserve.config import ModelSettings, Settings
from gpuserve.core.errors import BadRequest, ModelLoadError, ModelNotFound
from gpuserve.core.registry import Key, ModelRegistry
from gpuserve.http.responses import json_response
from gpuserve.protocols.schemas import ErrorResponse

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
    """Load the model, every version configured or in the repository folder, or reload it
    (new weights from its source) with no request failing: each new copy replaces the old
    once ready."""
    await load_model(*_context(request), name)
    return json_response({})


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
    await load_model(*_context(request), name, version)
    return json_response({})


@router.post("/models/{name}/versions/{version}/unload", responses=_ERRORS)
async def unload_version(request: Request, name: str, version: str) -> Response:
    """Stop serving one version; routes without a version move to the versions left."""
    models, settings = _context(request)
    await models.unload(name, settings.shutdown_timeout_s, version)
    return json_response({})


# The operations themselves, which gRPC's repository calls share.


def index_entries(models: ModelRegistry) -> list[dict[str, Any]]:
    """The repository index: each known model version's name, version, state and reason."""
    entries = []
    for name, version in models.configured:
        state, reason = models.state_of((name, version))
        entry = {"name": name, "version": version, "state": _STATES.get(state, "UNAVAILABLE")}
        if state != "ready" and reason:
            entry["reason"] = reason
        entries.append(entry)
    return entries


async def load_model(
    models: ModelRegistry, settings: Settings, name: str, version: str | None = None
) -> None:
    """Load or reload a model by name (and version): the configured versions and those in
    the repository folder; with `version`, that one only."""
    found = _in_repository(settings.repository_dir, name, models.configured)
    found.update({int(v): model for (n, v), model in models.configured.items() if n == name})
    if version is not None:
        found = {v: model for v, model in found.items() if str(v) == version}
    if not found:
        which = f"model {name!r}" + ("" if version is None else f" version {version!r}")
        raise ModelNotFound(f"no {which} is configured or in the repository")
    for _, model in sorted(found.items()):
        try:
            await models.load(model, settings.shutdown_timeout_s)
        except ModelLoadError as exc:
            raise BadRequest(f"failed to load {model.title!r}: {exc.message}") from None


def _in_repository(
    folder: Path | None, name: str, configured: dict[Key, ModelSettings]
) -> dict[int, ModelSettings]:
    """The versions of `name` in the repository folder, by version: `<name>.pt2` is version
    1, `<name>/<N>/model.pt2` version N (Triton's layout). Only names and version numbers
    come from a request, never a path, and nothing outside the folder is opened.

    A version of a configured model keeps that model's batching and device settings."""
    try:
        ModelSettings(name=name)  # checks the name's form: no separators, no dots first
    except ValueError:
        return {}
    if folder is None:
        return {}
    root = folder.resolve()
    paths = {1: root / f"{name}.pt2"}
    versions = root / name
    if versions.is_dir():
        for entry in versions.iterdir():
            if entry.name.isdigit() and int(entry.name) >= 1:
                paths[int(entry.name)] = entry / "model.pt2"
    base = _file_model(name, configured)
    found = {}
    for version, path in paths.items():
        path = path.resolve()
        if path.is_file() and path.is_relative_to(root):
            update = {"name": name, "version": version, "path": path, "spec": None}
            found[version] = base.model_copy(update=update)
    return found


def _file_model(name: str, configured: dict[Key, ModelSettings]) -> ModelSettings:
    """The settings a repository version of `name` starts from: the highest configured
    version's when that is served from a file, else the defaults."""
    files = [
        model
        for (n, _), model in configured.items()
        if n == name and model.path is not None and not (model.factory or model.handler)
    ]
    return max(files, key=lambda model: model.version) if files else ModelSettings(name=name)
