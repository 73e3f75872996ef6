"""`gpuserve init`: a starter config (and spec) for a model file, to edit and serve.

The config lists every model setting, commented out at its default with its description,
generated from the settings class so that it never drifts from what the server reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from gpuserve.config import ModelSettings, Settings
from gpuserve.core.errors import ModelLoadError
from gpuserve.spec import ModelSpec, TensorSpec

# What the config shows uncommented: what a user edits first.
_SERVER_KEYS = ("host", "port", "device")
_MODEL_KEYS = ("max_batch_size", "max_wait_ms")
# Settings that name another source of the model, or that init writes itself.
_SKIPPED_MODEL_KEYS = {"path", "name", "factory", "factory_kwargs", "weights", "handler", "spec"}


@dataclass(frozen=True)
class Started:
    """What `write_starter` wrote, and what the user still has to do."""

    config: Path
    spec: Path | None
    todo: list[str]


def write_starter(model: Path, config: Path) -> Started:
    """Write `config` for serving `model`, and the model's spec beside it if there is none.

    A `.pt2` program's spec is inferred from the program; a TorchScript file's is a template
    whose shapes must be filled in. Existing files are never overwritten: FileExistsError.
    """
    if config.exists():
        raise FileExistsError(f"{config} exists already; remove it or pass --config NEW.toml")
    if not model.is_file():
        raise ModelLoadError(f"model file not found: {model} (looked for {model.resolve()})")
    todo: list[str] = []
    spec_path = model.with_suffix(".json")
    written: Path | None = spec_path
    if spec_path.exists():
        written = None  # the model's own spec stays as it is
    elif model.suffix.lower() == ".pt2":
        from gpuserve.model.sources import load_program, spec_from_program

        spec_from_program(load_program(model), model.stem, model, 2).to_file(spec_path)
        todo.append(f"check {spec_path}: add `labels` for a classifier, and value ranges")
    else:
        template = TensorSpec(name="input", shape=(1,))
        ModelSpec(name=model.stem, input=template, output=TensorSpec(shape=(1,))).to_file(spec_path)
        todo.append(
            f"edit {spec_path}: TorchScript keeps no shapes, so set the input's and output's "
            "shape (without the batch dimension) and dtype"
        )
    # Relative to the config's folder, as the server reads it.
    relative = os.path.relpath(model.resolve(), config.resolve().parent)
    config.write_text(_config_text(Path(relative)))
    return Started(config, written, todo)


def _config_text(model: Path) -> str:
    lines = [
        "# gpuserve settings: every key is optional. Environment variables (GPUSERVE_PORT,",
        "# GPUSERVE_MODEL__MAX_BATCH_SIZE, ...) override this file, and flags override both.",
    ]
    server = Settings.model_fields
    lines += [_line(key, server[key], commented=False) for key in _SERVER_KEYS]
    lines += ["", "[model]", f"path = {json.dumps(model.as_posix())}  # relative to this file"]
    for key, field in ModelSettings.model_fields.items():
        if key not in _SKIPPED_MODEL_KEYS:
            lines.append(_line(key, field, commented=key not in _MODEL_KEYS))
    return "\n".join(lines) + "\n"


def _line(key: str, field: FieldInfo, commented: bool) -> str:
    default = field.get_default(call_default_factory=True)
    text = f"{'# ' if commented else ''}{key} = {_toml(default)}"
    description = (field.description or "").split(". ")[0].rstrip(".")
    if default is None:
        description = f"unset by default. {description}"
    return f"{text:<34}  # {description}" if description else text


def _toml(value: Any) -> str:
    if value is None:
        return '"..."'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        return json.dumps(value.as_posix())
    return json.dumps(value)
