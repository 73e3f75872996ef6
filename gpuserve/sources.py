"""Where a model's module comes from: a file, or a factory plus a weights file.

- `.pt2`: a `torch.export` program (`torch.export.save`), the format torch recommends now.
- `.pt`, `.ts`, `.torchscript`: a TorchScript module (`torch.jit.save`), for existing models.
- `factory = "package.module:callable"`: user code that builds a `torch.nn.Module`, with its
  state dict read from `weights` (`.safetensors`, or `.pt`/`.pth` with `weights_only=True`).
"""

from __future__ import annotations

import importlib
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from gpuserve.config import ModelSettings
from gpuserve.errors import ModelLoadError

_EXPORT_SUFFIXES = {".pt2"}
_TORCHSCRIPT_SUFFIXES = {".pt", ".ts", ".torchscript"}
_STATE_DICT_SUFFIXES = {".pt", ".pth", ".bin"}


def load_module(settings: ModelSettings, device: torch.device) -> torch.nn.Module:
    """The configured module, on `device`, in eval mode. Failures are ModelLoadErrors."""
    if settings.factory is not None:
        return _from_factory(settings, device)
    if settings.path is None:
        raise ModelLoadError(f"model {settings.key!r} has no file or factory to load")
    return _from_file(settings.path, device)


def import_object(target: str, code_dir: Path | None = None) -> Any:
    """Import `package.module:attribute`, from `code_dir` (default: the working directory)."""
    module_name, _, attribute = target.partition(":")
    folder = str((code_dir or Path.cwd()).resolve())
    # Users run `gpuserve` from their project; its console script does not put cwd on the path.
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot import {target} (from {folder}): {exc}") from exc
    return found


_EXPORT_LOAD = threading.Lock()


def _on_device(program: Any, device: torch.device) -> torch.nn.Module:
    """An exported program's module on `device`, the constants in its graph included."""
    try:
        from torch.export.passes import move_to_device_pass
    except ImportError:  # torch before 2.5 has no such pass
        module: torch.nn.Module = program.module()
        return module.to(device)
    moved: torch.nn.Module = move_to_device_pass(program, device).module()
    return moved


def require_file(path: Path) -> None:
    """ModelLoadError unless the model file is there, naming where it was looked for."""
    if not path.is_file():
        raise ModelLoadError(
            f"model file not found: {path} (looked for {path.resolve()}; relative paths are "
            "taken from the working directory)"
        )


def _from_file(path: Path, device: torch.device) -> torch.nn.Module:
    require_file(path)
    suffix = path.suffix.lower()
    try:
        if suffix in _EXPORT_SUFFIXES:
            # torch.export.load is not thread-safe, and each model loads in its own thread.
            with _EXPORT_LOAD:
                program = torch.export.load(str(path))
            # The export pass moves the constants baked into the graph too; `.to(device)` on
            # the module would leave those behind.
            # An exported program is frozen in the mode it was exported in: no .eval() here.
            return _on_device(program, device)
        if suffix in _TORCHSCRIPT_SUFFIXES:
            with warnings.catch_warnings():
                # TorchScript is deprecated in torch, but users still hold such files.
                warnings.simplefilter("ignore", DeprecationWarning)
                scripted: torch.nn.Module = torch.jit.load(str(path), map_location=device)
            return scripted.eval()
    except Exception as exc:
        kind = "a torch.export program" if suffix in _EXPORT_SUFFIXES else "a TorchScript module"
        raise ModelLoadError(
            f"could not load {path} as {kind}: {type(exc).__name__}: {exc}"
        ) from exc
    known = ", ".join(sorted(_EXPORT_SUFFIXES | _TORCHSCRIPT_SUFFIXES))
    raise ModelLoadError(
        f"unknown model format {suffix!r} for {path}: use one of {known}, or a factory"
    )


def _from_factory(settings: ModelSettings, device: torch.device) -> torch.nn.Module:
    assert settings.factory is not None
    factory = import_object(settings.factory, settings.code_dir)
    if not callable(factory):
        raise ModelLoadError(f"{settings.factory} is not callable")
    try:
        module = factory(**settings.factory_kwargs)
    except Exception as exc:
        raise ModelLoadError(f"{settings.factory} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(
            f"{settings.factory} returned {type(module).__name__}, not a torch.nn.Module"
        )
    if settings.weights is not None:
        _load_weights(module, settings.weights)
    return module.to(device).eval()


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load a state dict strictly: a missing or unexpected key is a load error, not a guess."""
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif suffix in _STATE_DICT_SUFFIXES:
            # weights_only: a pickle from elsewhere must not run code on load.
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise ModelLoadError(
                f"unknown weights format {suffix!r} for {path}: use .safetensors or .pt"
            )
        if not isinstance(state, dict):
            raise ModelLoadError(f"{path} holds a {type(state).__name__}, not a state dict")
        module.load_state_dict(state, strict=True)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not load weights {path}: {type(exc).__name__}: {exc}") from exc
