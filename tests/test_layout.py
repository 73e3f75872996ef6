"""A folder given as the model's path (KServe's /mnt/models): which model file it holds."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gpuserve.config import ModelSettings
from gpuserve.model.layout import Found, model_in_folder


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_a_folder_of_one_model_file_serves_that_file(tmp_path: Path) -> None:
    model = touch(tmp_path / "scorer.pt2")
    touch(tmp_path / "scorer.json")
    touch(tmp_path / "README.md")
    assert model_in_folder(tmp_path) == Found(model)
    settings = ModelSettings(path=tmp_path)
    assert settings.path == model and settings.key == "scorer"


def test_a_triton_repository_of_one_model_serves_its_highest_version(tmp_path: Path) -> None:
    touch(tmp_path / "ranker" / "config.pbtxt")
    touch(tmp_path / "ranker" / "2" / "model.pt2")
    newest = touch(tmp_path / "ranker" / "10" / "model.pt")
    touch(tmp_path / "ranker" / "11" / "weights.bin")  # no model file: not a version
    assert model_in_folder(tmp_path) == Found(newest, "ranker", 10)
    settings = ModelSettings(path=tmp_path)
    assert (settings.path, settings.key, settings.version) == (newest, "ranker", 10)
    # A name given (KServe's --name) wins over the folder's.
    assert ModelSettings(path=tmp_path, name="isvc").key == "isvc"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["a.pt2", "b.pt"], r"several model files \(a\.pt2, b\.pt\)"),
        (["one/1/model.pt2", "two/1/model.pt2"], r"several models \(one, two\)"),
        (["notes.txt"], "holds no model file"),
    ],
)
def test_a_folder_that_holds_no_single_model_says_what_it_holds(
    tmp_path: Path, files: list[str], message: str
) -> None:
    for name in files:
        touch(tmp_path / name)
    with pytest.raises(ValueError, match=message):
        model_in_folder(tmp_path)
    with pytest.raises(ValidationError, match=message):
        ModelSettings(path=tmp_path)
