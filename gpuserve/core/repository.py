"""The model repository's operations, shared by the HTTP and gRPC repository APIs: load (or
reload) a model by name, from the configured versions and the repository folder."""

from __future__ import annotations

from pathlib import Path

from gpuserve.config import ModelSettings, Settings, valid_name
from gpuserve.core.errors import InvalidInput, ModelLoadError, ModelNotFound
from gpuserve.core.registry import Key, ModelRegistry


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
            raise InvalidInput(f"failed to load {model.title!r}: {exc.message}") from None


def _in_repository(
    folder: Path | None, name: str, configured: dict[Key, ModelSettings]
) -> dict[int, ModelSettings]:
    """The versions of `name` in the repository folder, by version: `<name>.pt2` is version
    1, `<name>/<N>/model.pt2` version N (Triton's layout). Only names and version numbers
    come from a request, never a path, and nothing outside the folder is opened.

    A version of a configured model keeps that model's batching and device settings."""
    if folder is None or not valid_name(name):  # no separators, no dots first
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
            if base is None:
                found[version] = ModelSettings(name=name, version=version, path=path)
            else:
                update = {"name": name, "version": version, "path": path, "spec": None}
                found[version] = base.model_copy(update=update)
    return found


def _file_model(name: str, configured: dict[Key, ModelSettings]) -> ModelSettings | None:
    """The settings a repository version of `name` starts from: the highest configured
    version's when that is served from a file, else None (the defaults)."""
    files = [
        model
        for (n, _), model in configured.items()
        if n == name and model.path is not None and not (model.factory or model.handler)
    ]
    return max(files, key=lambda model: model.version) if files else None


def on_disk(folder: Path | None) -> list[Key]:
    """Every model version in the repository folder, whether loaded or not: `<name>.pt2`
    (version 1) and `<name>/<N>/model.pt2` (Triton's layout), by name and version."""
    if folder is None or not folder.is_dir():
        return []
    found: set[Key] = set()
    root = folder.resolve()
    for entry in root.iterdir():
        # The same rules as a load by name: a name's form, files inside the folder only.
        name = entry.stem if entry.suffix == ".pt2" else entry.name
        found.update((name, str(version)) for version in _in_repository(root, name, {}))
    return sorted(found)
