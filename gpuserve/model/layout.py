"""Which file in a folder is the model: what `gpuserve serve FOLDER` serves.

KServe's storage initializer lays a model out under `/mnt/models` as it was stored: one file,
a folder holding one model file (its spec beside it), or a Triton model repository of one
model (`<name>/<version>/model.pt2`, with a `config.pbtxt` gpuserve does not read). No torch
here: the settings resolve a folder when they are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The files gpuserve loads as models: torch.export programs (or AOTInductor packages), and
# TorchScript.
EXPORT_SUFFIXES = frozenset({".pt2"})
TORCHSCRIPT_SUFFIXES = frozenset({".pt", ".ts", ".torchscript"})
MODEL_SUFFIXES = EXPORT_SUFFIXES | TORCHSCRIPT_SUFFIXES
# State dicts read into a factory's module (`weights`): .safetensors, or torch.load's own.
STATE_DICT_SUFFIXES = frozenset({".pt", ".pth", ".bin"})
WEIGHTS_SUFFIXES = STATE_DICT_SUFFIXES | {".safetensors"}


@dataclass(frozen=True)
class Found:
    """The model file in a folder, and the name and version its layout gives (None: none)."""

    path: Path
    name: str | None = None
    version: int | None = None


def model_in_folder(folder: Path) -> Found:
    """The one model a folder holds; ValueError saying what it holds when that is not one."""
    files = _models(folder)
    if len(files) == 1:
        return Found(files[0])
    if files:
        raise ValueError(
            f"{folder} holds several model files ({', '.join(f.name for f in files)}): name "
            "one (path = FOLDER/FILE)"
        )
    # A Triton repository: <name>/<version>/model.*, the highest version served.
    repositories = [
        (entry.name, version, found)
        for entry in sorted(folder.iterdir())
        if entry.is_dir() and not entry.name.startswith(".")
        for version, found in _versions(entry)
    ]
    names = sorted({name for name, _, _ in repositories})
    if len(names) == 1:
        name, version, found = max(repositories, key=lambda found: found[1])
        return Found(found, name, version)
    if names:
        raise ValueError(
            f"{folder} is a repository of several models ({', '.join(names)}): list them "
            "under [[models]] in a config file"
        )
    suffixes = ", ".join(sorted(MODEL_SUFFIXES))
    raise ValueError(f"{folder} holds no model file ({suffixes}), nor <name>/<version>/model.*")


def _models(folder: Path) -> list[Path]:
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and entry.suffix.lower() in MODEL_SUFFIXES
    )


def _versions(model: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in model.iterdir():
        if entry.is_dir() and entry.name.isdigit():
            files = [f for f in _models(entry) if f.stem == "model"]
            if len(files) == 1:
                found.append((int(entry.name), files[0]))
    return found
