"""The `gpuserve` command line: probe, and start-up errors that must stop the process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpuserve.cli import _warn_if_exposed
from gpuserve.config import Settings

from .conftest import ROOT


def gpuserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuserve", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_probe_prints_the_device_and_the_reason_as_json() -> None:
    result = gpuserve("probe")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["device"] == "cpu"
    assert info["reason"].startswith("no usable CUDA device")


def test_probe_of_a_missing_cuda_device_exits_2_with_the_reason() -> None:
    result = gpuserve("probe", "--device", "cuda")
    assert result.returncode == 2
    assert "was requested but" in json.loads(result.stdout)["error"]


def test_serve_on_a_missing_cuda_device_fails_at_once() -> None:
    result = gpuserve("serve", "--device", "cuda:0", "--port", "0")
    assert result.returncode == 1
    assert "gpuserve: device 'cuda:0' was requested but" in result.stderr


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    result = gpuserve("serve", "--config", str(tmp_path / "none.toml"))
    assert result.returncode == 1
    assert "config file not found" in result.stderr


def test_an_invalid_setting_is_explained(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[model]\nmax_batch_size = 0\n")
    result = gpuserve("serve", "--config", str(config))
    assert result.returncode == 1
    assert "max_batch_size" in result.stderr and "greater than or equal to 1" in result.stderr


def test_serving_beyond_loopback_without_keys_warns(caplog: pytest.LogCaptureFixture) -> None:
    _warn_if_exposed(Settings(host="0.0.0.0"))
    assert "without API keys" in caplog.text
    caplog.clear()
    _warn_if_exposed(Settings(host="0.0.0.0", api_keys=["x" * 20]))
    _warn_if_exposed(Settings(host="127.0.0.1"))
    assert caplog.text == ""
