"""Model files are code: only files that this server's user (or root) alone can change are
loaded, as SSH's StrictModes has it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gpuserve.core.errors import ModelLoadError
from gpuserve.model.sources import import_object, require_file, require_trusted


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir(mode=0o755)
    path = folder / "m.pt2"
    path.write_bytes(b"a model")
    path.chmod(0o644)
    return path


def test_a_file_only_its_owner_can_write_is_trusted(model: Path) -> None:
    require_trusted(model)
    require_file(model)


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_a_file_others_can_write_is_refused_saying_how_to_fix_it(model: Path, mode: int) -> None:
    model.chmod(mode)
    with pytest.raises(ModelLoadError, match=r"can be written by other users.*chmod go-w"):
        require_file(model)


def test_a_folder_others_can_write_is_refused(model: Path) -> None:
    model.parent.chmod(0o777)
    try:
        with pytest.raises(ModelLoadError, match=str(model.parent)):
            require_trusted(model)
    finally:
        model.parent.chmod(0o755)


def test_a_link_in_a_folder_others_can_write_is_refused(model: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o777)  # not sticky: anyone may swap the link
    link = shared / "m.pt2"
    link.symlink_to(model)
    with pytest.raises(ModelLoadError, match="can be written by other users"):
        require_trusted(link)


def test_a_sticky_folder_of_roots_is_accepted(tmp_path: Path) -> None:
    tmp = Path("/tmp").resolve()
    info = tmp.stat()
    if not (info.st_mode & stat.S_ISVTX and info.st_uid == 0 and tmp_path.is_relative_to(tmp)):
        pytest.skip("the test folder is not under a root-owned sticky /tmp here")
    path = tmp_path / "m.pt2"
    path.write_bytes(b"a model")
    path.chmod(0o644)
    require_trusted(path)  # /tmp is world-writable, but sticky and root's


def test_a_file_of_another_user_is_refused(model: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    os.chown(model, 12345, 12345)
    with pytest.raises(ModelLoadError, match="belongs to user 12345"):
        require_trusted(model)


def test_a_code_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir(mode=0o755)
    (code / "mine.py").write_text("VALUE = 1\n")
    assert import_object("mine:VALUE", code) == 1
    code.chmod(0o777)
    with pytest.raises(ModelLoadError, match="can be written by other users"):
        import_object("mine:VALUE", code)
