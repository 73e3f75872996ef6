"""`gpuserve from-torchserve`: TorchServe archives (built here, as torch-model-archiver lays
them out) turned into folders gpuserve serves, labels included; what cannot be converted is
refused or noted, saying why."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gpuserve.cli import main
from gpuserve.config import Settings
from gpuserve.model.loading import load_model
from gpuserve.model.torchserve import ArchiveError, convert

from .helpers import CPU

LABELS = {"0": ["n01", "cat"], "1": ["n02", "dog"], "2": ["n03", "eel"]}
MODEL_PY = """
import torch


class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.layer(x)
"""


def classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3).eval()


def archive(path: Path, manifest: dict[str, Any], files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as mar:
        mar.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": manifest}))
        for name, data in files.items():
            mar.writestr(name, data)
    return path


def scripted() -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # TorchScript is deprecated; TorchServe users hold such files
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(classifier()), buffer)
    return buffer.getvalue()


def state_dict() -> bytes:
    buffer = io.BytesIO()
    torch.save({f"layer.{k}": v for k, v in classifier().state_dict().items()}, buffer)
    return buffer.getvalue()


def with_input_shape(spec: Path) -> None:
    """The one edit the conversion leaves to the user: the input's shape."""
    body = json.loads(spec.read_text())
    body["input"]["shape"] = [4]
    spec.write_text(json.dumps(body))


def answers(config: Path) -> list[Any]:
    settings = Settings(config_file=config)
    assert settings.model is not None
    runner = load_model(settings.model, CPU)
    rows = runner([np.array([1, 2, 3, 4], np.float32), np.array([-4, 0, 1, 9], np.float32)])
    return [runner.postprocess(row) for row in rows]


def expected() -> list[str]:
    logits = classifier()(torch.tensor([[1.0, 2, 3, 4], [-4, 0, 1, 9]]))
    return [["cat", "dog", "eel"][int(i)] for i in logits.argmax(dim=1)]


def test_a_torchscript_archive_is_served_with_its_labels(tmp_path: Path) -> None:
    mar = archive(
        tmp_path / "animals.mar",
        {"modelName": "animals", "serializedFile": "animals.pt", "handler": "image_classifier"},
        {"animals.pt": scripted(), "index_to_name.json": json.dumps(LABELS).encode()},
    )
    converted = convert(mar, tmp_path / "out")
    assert [path.name for path in converted.files] == ["animals.pt"]
    assert json.loads(converted.spec.read_text())["labels"] == ["cat", "dog", "eel"]
    assert any("input's shape" in note for note in converted.notes)
    assert any("image_classifier handler decoded images" in note for note in converted.notes)
    with_input_shape(converted.spec)
    assert [answer["label"] for answer in answers(converted.config)] == expected()


def test_an_eager_archive_becomes_a_factory_and_its_weights(tmp_path: Path) -> None:
    mar = archive(
        tmp_path / "eager.mar",
        {
            "modelName": "eager",
            "serializedFile": "weights.pth",
            "modelFile": "model.py",
            "handler": "my_handler.py",
        },
        {
            "model.py": MODEL_PY.encode(),
            "weights.pth": state_dict(),
            "my_handler.py": b"raise SystemExit('never run')\n",
            "index_to_name.json": json.dumps(LABELS).encode(),
        },
    )
    converted = convert(mar, tmp_path / "out")
    config = converted.config.read_text()
    assert 'factory = "model:Classifier"' in config and 'weights = "weights.pth"' in config
    assert any("custom handler my_handler.py is not converted" in n for n in converted.notes)
    assert not (tmp_path / "out" / "my_handler.py").exists()  # a handler is never copied
    with_input_shape(converted.spec)
    assert [answer["label"] for answer in answers(converted.config)] == expected()


@pytest.mark.parametrize(
    ("manifest", "files", "message"),
    [
        ({"serializedFile": "model.onnx"}, {"model.onnx": b"x"}, "not a PyTorch model"),
        ({"handler": "custom.py"}, {"custom.py": b""}, "holds no serialized model"),
        (
            {"serializedFile": "w.pth", "modelFile": "model.py"},
            {"w.pth": b"", "model.py": (MODEL_PY + MODEL_PY.replace("Classifier", "B")).encode()},
            r"defines 2 torch.nn.Module classes \(Classifier, B\)",
        ),
        (
            {"serializedFile": "m.pt"},
            {"m.pt": b"", "index_to_name.json": b'{"0": "a", "2": "c"}'},
            "every class from 0",
        ),
    ],
)
def test_what_cannot_be_converted_is_refused_saying_why(
    tmp_path: Path, manifest: dict[str, Any], files: dict[str, bytes], message: str
) -> None:
    mar = archive(tmp_path / "bad.mar", manifest, files)
    with pytest.raises(ArchiveError, match=message):
        convert(mar, tmp_path / "out")


def test_not_an_archive_and_a_used_folder_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.mar"
    plain.write_text("not a zip")
    with pytest.raises(ArchiveError, match="not a TorchServe archive"):
        convert(plain, tmp_path / "out")
    mar = archive(tmp_path / "a.mar", {"serializedFile": "a.pt"}, {"a.pt": scripted()})
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(ArchiveError, match="not empty"):
        convert(mar, tmp_path / "used")
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"


def test_the_command_prints_what_it_wrote_and_what_is_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mar = archive(
        tmp_path / "animals.mar",
        {"modelName": "animals", "serializedFile": "animals.pt"},
        {"animals.pt": scripted(), "index_to_name.json": json.dumps(LABELS).encode()},
    )
    main(["from-torchserve", str(mar), "--out", str(tmp_path / "served")])
    printed = capsys.readouterr().out
    assert "config.toml" in printed and "note: edit" in printed
    assert f"gpuserve serve --config {tmp_path / 'served' / 'config.toml'}" in printed
    with pytest.raises(SystemExit, match="not a TorchServe archive"):
        main(["from-torchserve", str(tmp_path / "missing.mar")])
