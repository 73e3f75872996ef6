"""`gpuserve from-torchserve`: a TorchServe model archive (`.mar`) as a folder gpuserve serves.

What converts: the model (a TorchScript file, or an eager model's `model.py` and its state
dict, or a `.pt2` program), and `index_to_name.json` as the spec's labels. What cannot: the
handler's code (TorchServe's built-in handlers decode images or text before the model; a
custom handler is code to port to a gpuserve `Handler`), and the input's shape, which an
archive does not record. Both are said in the notes the conversion returns.

Nothing in the archive is run or imported: the manifest and labels are read as JSON, an eager
model's class is found by reading its source, and files are written under their own base names.
"""

from __future__ import annotations

import ast
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from gpuserve.model.layout import MODEL_SUFFIXES, WEIGHTS_SUFFIXES
from gpuserve.spec import ModelSpec, TensorSpec

_MANIFEST = "MAR-INF/MANIFEST.json"
# What TorchServe's built-in handlers did around the model, which a gpuserve model is sent
# already done (or does in a Handler's preprocess).
_BUILT_IN = {
    "image_classifier": "decoded images and applied torchvision transforms before the model",
    "text_classifier": "tokenised text before the model",
    "object_detector": "decoded images and returned boxes",
    "image_segmenter": "decoded images and returned masks",
}


class ArchiveError(ValueError):
    """The archive cannot be turned into a served model: the message says why."""


@dataclass
class Converted:
    """What the conversion wrote (`config`, the model's files, `spec`), and what is left to
    do by hand."""

    config: Path
    spec: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def convert(archive: Path, out: Path) -> Converted:
    """Write a gpuserve config, the model's files and a spec for `archive` into `out` (a new
    or empty folder). ArchiveError when it cannot be done."""
    try:
        opened = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{archive} is not a TorchServe archive (.mar, a zip): {exc}") from None
    with opened:
        members = {PurePosixPath(name).name: name for name in opened.namelist()}
        if _MANIFEST not in opened.namelist():
            raise ArchiveError(f"{archive} has no {_MANIFEST}: not a TorchServe model archive")
        manifest = json.loads(opened.read(_MANIFEST)).get("model", {})
        name = _name(manifest.get("modelName") or archive.stem)
        serialized = manifest.get("serializedFile")
        if not serialized or PurePosixPath(serialized).name not in members:
            raise ArchiveError(
                f"{archive} holds no serialized model (serializedFile: {serialized!r}); a "
                "handler that builds or downloads its model cannot be converted"
            )
        if out.exists() and any(out.iterdir()):
            raise ArchiveError(f"{out} is not empty: give a new folder (--out)")
        out.mkdir(parents=True, exist_ok=True)
        notes: list[str] = []
        labels = _labels(opened, members)
        model_file = manifest.get("modelFile")
        written = []
        serialized_name = PurePosixPath(serialized).name
        suffix = PurePosixPath(serialized_name).suffix.lower()
        if model_file:
            source = opened.read(members[PurePosixPath(model_file).name]).decode()
            module_name = PurePosixPath(model_file).stem
            cls = _module_class(source, model_file)
            if suffix not in WEIGHTS_SUFFIXES:
                raise ArchiveError(
                    f"{serialized_name} is not a state dict gpuserve reads (.safetensors, .pt, "
                    ".pth, .bin)"
                )
            written.append(_extract(opened, members[PurePosixPath(model_file).name], out))
            weights = _extract(opened, members[serialized_name], out)
            written.append(weights)
            model_lines = [
                f'name = "{name}"',
                f'factory = "{module_name}:{cls}"  # the class of {model_file}',
                f'weights = "{weights.name}"',
                'code_dir = "."',
            ]
        elif suffix in MODEL_SUFFIXES:
            model = _extract(opened, members[serialized_name], out, f"{name}{suffix}")
            written.append(model)
            model_lines = [f'path = "{model.name}"']
        else:
            raise ArchiveError(
                f"{serialized_name} is not a PyTorch model gpuserve serves: a TorchScript "
                "file, a .pt2 program, or an eager model's state dict with its model.py"
            )
        spec_path = out / f"{name}.json"
        output = TensorSpec(name="output", shape=(len(labels) if labels else 1,))
        ModelSpec(
            name=name, input=TensorSpec(name="input", shape=(1,)), output=output, labels=labels
        ).to_file(spec_path)
        model_lines.append(f'spec = "{spec_path.name}"')
        notes.append(
            f"edit {spec_path}: a TorchServe archive does not record the input's shape; set "
            "the input's shape (without the batch dimension) and dtype"
            + ("" if labels else ", and the output's")
        )
        if labels:
            notes.append(f"labels: {len(labels)} from index_to_name.json, as /predict's answers")
        notes += _handler_notes(manifest.get("handler", ""), members)
        config = out / "config.toml"
        config.write_text(
            f"# Converted from {archive.name}: gpuserve serve --config {config.name}\n"
            "[model]\n" + "\n".join(model_lines) + "\n"
        )
        return Converted(config, spec_path, written, notes)


def _name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.")
    return cleaned or "model"


def _labels(archive: zipfile.ZipFile, members: dict[str, str]) -> list[str] | None:
    """index_to_name.json's names, in index order: {"0": "cat"} or {"0": ["n0144", "tench"]}."""
    if "index_to_name.json" not in members:
        return None
    mapping: dict[str, Any] = json.loads(archive.read(members["index_to_name.json"]))
    try:
        indices = sorted(mapping, key=int)
    except ValueError:
        raise ArchiveError("index_to_name.json's keys are not class indices") from None
    if [int(i) for i in indices] != list(range(len(indices))):
        raise ArchiveError("index_to_name.json does not name every class from 0 in order")
    return [str(v[-1] if isinstance(v, list) else v) for v in (mapping[i] for i in indices)]


def _module_class(source: str, model_file: str) -> str:
    """The one class of an eager model's file that subclasses torch's Module, read from its
    source (TorchServe's own rule: one such class per model file)."""
    classes = [
        node.name
        for node in ast.parse(source).body
        if isinstance(node, ast.ClassDef)
        and any(ast.unparse(base).split(".")[-1] == "Module" for base in node.bases)
    ]
    if len(classes) != 1:
        raise ArchiveError(
            f"{model_file} defines {len(classes)} torch.nn.Module classes "
            f"({', '.join(classes) or 'none'}): one is needed, as TorchServe needs"
        )
    return classes[0]


def _extract(archive: zipfile.ZipFile, member: str, out: Path, as_name: str | None = None) -> Path:
    """One member, written under its base name (or `as_name`) in `out`, never elsewhere."""
    target = out / PurePosixPath(as_name or member).name
    target.write_bytes(archive.read(member))
    return target


def _handler_notes(handler: str, members: dict[str, str]) -> list[str]:
    base = PurePosixPath(handler.split(":")[0]).stem if handler else ""
    if not base:
        return []
    if base in _BUILT_IN:
        return [
            f"TorchServe's {base} handler {_BUILT_IN[base]}: gpuserve takes tensors, so send "
            "those, or write a gpuserve Handler whose preprocess does it (docs/models.md)"
        ]
    if f"{base}.py" in members:
        return [
            f"the custom handler {base}.py is not converted (nor run): port its preprocess and "
            "postprocess to a gpuserve Handler (docs/migrating-from-torchserve.md)"
        ]
    return [f"the handler {handler!r} is not converted"]
