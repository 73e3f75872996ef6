"""Load progress: the real file loaders count what they read, and long reads are logged."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gpuserve.config import ModelSettings
from gpuserve.core import progress
from gpuserve.core.progress import LoadProgress, tracking
from gpuserve.model.sources import load_module

CPU = torch.device("cpu")


def wide() -> torch.nn.Module:
    return torch.nn.Linear(512, 512)  # 1 MiB of weights: several reads


def loaded(settings: ModelSettings) -> LoadProgress:
    with tracking(LoadProgress(settings.key)) as tracked:
        load_module(settings, CPU)
    return tracked


def test_each_format_counts_its_bytes_up_to_the_files_size(tmp_path: Path) -> None:
    exported = tmp_path / "wide.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(wide(), (torch.randn(2, 512),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(exported))
    scripted = tmp_path / "wide.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(wide()), str(scripted))
    (tmp_path / "wide_factory.py").write_text(
        "import torch\ndef build():\n    return torch.nn.Linear(512, 512)\n"
    )
    safetensors = tmp_path / "wide.safetensors"
    save_file(wide().state_dict(), str(safetensors))
    state = tmp_path / "wide.pth"
    torch.save(wide().state_dict(), str(state))
    factory = {"name": "w", "factory": "wide_factory:build", "code_dir": tmp_path}
    for settings, file in [
        (ModelSettings(path=exported), exported),
        (ModelSettings(path=scripted), scripted),
        (ModelSettings(**factory, weights=safetensors), safetensors),
        (ModelSettings(**factory, weights=state), state),
    ]:
        tracked = loaded(settings)
        size = file.stat().st_size
        assert tracked.bytes_total == size, file
        # Weights are most of each file, and all of them are read.
        assert 512 * 512 * 4 <= tracked.to_dict()["bytes_read"] <= size, file


def test_a_long_read_is_logged_with_its_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(progress, "_LOG_EVERY_S", 0.0)
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(4 * 2**20))
    log = caplog.at_level("INFO", logger="gpuserve.model.loading")
    with log, tracking(LoadProgress("big")), progress.open_counted(path) as file:
        while file.read(2**20):
            pass
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading big")]
    assert lines and lines[-1].startswith("loading big: 4.0 of 4.0 MiB read (100%)")


def test_reads_outside_a_load_count_nowhere(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"abc")
    assert progress.current() is None
    with progress.open_counted(path) as file:
        assert file.read() == b"abc"
