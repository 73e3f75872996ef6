"""The `gpuserve` command line: probe, and start-up errors that must stop the process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpuserve.cli import main, probe_table
from gpuserve.config import Settings
from gpuserve.model.device import DeviceInfo, GpuSample
from gpuserve.server import _warn_if_exposed

from .helpers import ROOT


def gpuserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuserve", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_probe_prints_the_device_and_the_reason_as_json() -> None:
    result = gpuserve("probe", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["device"] == "cpu"
    assert info["reason"].startswith("no usable CUDA device")
    assert info["gpus"] == [] and "NVML" in info["nvml"]


def test_probe_prints_a_table_by_default() -> None:
    result = gpuserve("probe")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("device   cpu  (")
    assert "reason   no usable CUDA device" in result.stdout
    assert "GPUs     none seen by NVML (the NVIDIA driver library (NVML) was not found)" in (
        result.stdout
    )


def test_the_probe_table_lists_every_gpu_and_what_it_reports() -> None:
    info = DeviceInfo(
        device="cuda:1",
        kind="cuda",
        name="Fake H100",
        reason="most free memory",
        index=1,
        total_memory_bytes=80 * 2**30,
        free_memory_bytes=70 * 2**30,
        torch_version="2.13.0",
        cuda_version="12.8",
    )
    gpus = [
        GpuSample(0, "Fake H100", 0.9, 50 * 2**30, 80 * 2**30, 61.0, 312.5),
        GpuSample(1, "Fake H100", 0.05, 10 * 2**30, 80 * 2**30, 40.0, None),
    ]
    table = probe_table(info, gpus, None).splitlines()
    assert table[0] == "device   cuda:1  (Fake H100)"
    assert table[3] == "memory   70.0 GiB free of 80.0 GiB"
    assert table[5].split() == [
        "GPU",
        "name",
        "memory",
        "used",
        "/",
        "total",
        "util",
        "temp",
        "power",
    ]
    assert table[6].split() == [
        "0",
        "Fake",
        "H100",
        "50.0",
        "GiB",
        "/",
        "80.0",
        "GiB",
        "90%",
        "61",
        "C",
        "312",
        "W",
    ]
    assert table[7].split()[-3:] == ["40", "C", "-"]  # no power reading: a dash, not 0


def test_probe_of_a_missing_cuda_device_exits_2_with_the_reason() -> None:
    result = gpuserve("probe", "--device", "cuda", "--json")
    assert result.returncode == 2
    assert "was requested but" in json.loads(result.stdout)["error"]
    table = gpuserve("probe", "--device", "cuda")
    assert table.returncode == 2 and "gpuserve: device 'cuda' was requested but" in table.stderr


def test_serve_on_a_missing_cuda_device_fails_at_once() -> None:
    result = gpuserve("serve", "models/digits.pt2", "--device", "cuda:0", "--port", "0")
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


SHORT_KEY, GOOD_KEY = "short-secret-1", "a-good-secret-key-0123456789"


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        (
            {"GPUSERVE_API_KEYS": f"{SHORT_KEY},{GOOD_KEY}"},
            "api_keys (environment variable GPUSERVE_API_KEYS): API keys must be at least",
        ),
        ({"GPUSERVE_API_KEYS": GOOD_KEY, "GPUSERVE_DEFAULT_MODEL": "nope"}, "default_model 'nope'"),
        (
            {"GPUSERVE_API_KEYS": GOOD_KEY, "GPUSERVE_PORT": "-1"},
            "port (environment variable GPUSERVE_PORT): Input should be",
        ),
    ],
)
def test_a_settings_error_never_prints_the_api_keys(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    problem: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        main(["serve"])
    message = str(stopped.value.code)
    assert problem in message
    assert SHORT_KEY not in message and GOOD_KEY not in message
    assert "errors.pydantic.dev" not in message and "input_value" not in message
    assert GOOD_KEY not in capsys.readouterr().err


def test_api_keys_are_secrets_in_every_rendering() -> None:
    settings = Settings(api_keys=[GOOD_KEY])
    for rendering in (repr(settings), str(settings), settings.model_dump_json()):
        assert GOOD_KEY not in rendering
    assert settings.api_key_values() == [GOOD_KEY]
    with pytest.raises(ValueError) as refused:
        Settings(api_keys=[SHORT_KEY], port=-5)
    assert SHORT_KEY not in str(refused.value)


def test_every_flag_of_serve_says_its_default_and_its_environment_variable() -> None:
    result = gpuserve("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag, variable in [
        ("--config", "GPUSERVE_CONFIG_FILE"),
        ("--device", "GPUSERVE_DEVICE"),
        ("--log-level", "GPUSERVE_LOG_LEVEL"),
        ("--model", "GPUSERVE_MODEL__PATH"),
        ("--host", "GPUSERVE_HOST"),
        ("--port", "GPUSERVE_PORT"),
    ]:
        assert flag in text and f"environment: {variable}" in text
    assert "(default: 8000; environment: GPUSERVE_PORT)" in text
    assert "examples:" in result.stdout and "gpuserve serve model.pt2" in result.stdout
    top = gpuserve("--help").stdout
    assert all(command in top for command in ("serve", "probe", "init"))


def test_a_model_file_on_the_command_line_sets_the_model_path() -> None:
    from gpuserve.cli import _flags, parser

    for argv in (["serve", "m.pt2"], ["serve", "--model", "m.pt2"]):
        flags = _flags(parser().parse_args(argv))
        assert Settings(**flags).model.path == Path("m.pt2")


def test_serve_without_a_model_says_what_to_give(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing named, nothing served: no demo model the user never asked for."""
    for name in ("GPUSERVE_CONFIG_FILE", "GPUSERVE_MODEL__PATH", "GPUSERVE_MODELS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as bare:
        main(["serve", "--port", "0"])
    assert "no model to serve: give a model file (gpuserve serve model.pt2)" in str(bare.value.code)
    empty = tmp_path / "empty.toml"
    for text in ("", 'host = "127.0.0.1"\n', "[model]\n"):
        empty.write_text(text)
        with pytest.raises(SystemExit) as stopped:
            main(["serve", "--config", str(empty)])
        message = str(stopped.value.code)
        if text == "[model]\n":  # a table that names nothing is a settings error
            assert "model (config file" in message and "needs a path" in message
        else:
            assert f"the config file {empty} names no model: add a [model] table" in message
    assert "digits" not in message


@pytest.mark.parametrize("source", ["file", "environment", "python"])
def test_an_empty_list_of_models_is_a_settings_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    monkeypatch.delenv("GPUSERVE_MODELS", raising=False)
    argv = ["serve", "--port", "0"]
    if source == "python":
        with pytest.raises(ValueError, match="an empty list serves nothing"):
            Settings(models=[])
        return
    if source == "file":
        config = tmp_path / "none.toml"
        config.write_text("models = []\n")
        argv += ["--config", str(config)]
    else:
        monkeypatch.setenv("GPUSERVE_MODELS", "[]")
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    message = str(stopped.value.code)
    assert "models (" in message and "an empty list serves nothing" in message
    where = "key models" if source == "file" else "environment variable GPUSERVE_MODELS"
    assert where in message


def test_settings_without_a_model_round_trip() -> None:
    """A dump of settings (as workers and Ray replicas receive them) validates again."""
    for settings in (Settings(), Settings(model={"path": "m.pt2"})):
        again = Settings.model_validate(settings.model_dump())
        assert again.served_models == settings.served_models


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--workers", "two"], {}, "workers (flag --workers): workers must be a number"),
        (["--workers", "0"], {}, "workers (flag --workers): workers must be between 1 and 256"),
        (
            [],
            {"GPUSERVE_WORKERS": "many"},
            "workers (environment variable GPUSERVE_WORKERS): workers must be a number",
        ),
        (
            [],
            {"GPUSERVE_MODEL__MAX_BATCH_SIZE": "abc"},
            "model.max_batch_size (environment variable GPUSERVE_MODEL__MAX_BATCH_SIZE)",
        ),
        (["--model", ""], {}, "model.path (flag --model): path must name a model file"),
        (
            ["--workers", "2", "--config", "REPOSITORY"],
            {},
            "settings (repository_api: config file REPOSITORY, key repository_api; workers: "
            "flag --workers): repository_api needs workers = 1",
        ),
    ],
)
def test_a_settings_error_names_the_source_that_set_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    env: dict[str, str],
    expected: str,
) -> None:
    """Each line says where the value came from: a flag that set a model's path is not
    where the model's other settings came from, and a rule across settings names each."""
    config = tmp_path / "repository.toml"
    config.write_text("repository_api = true\n")
    argv = [str(config) if arg == "REPOSITORY" else arg for arg in argv]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    model = [] if "--model" in argv else ["models/digits.pt2"]
    with pytest.raises(SystemExit) as stopped:
        main(["serve", *model, *argv])
    message = str(stopped.value.code).replace(str(config), "REPOSITORY")
    assert expected in message, message
    assert "literal[" not in message and ".int " not in message and "(default)" not in message


def test_a_port_in_use_stops_the_server_with_status_1_before_any_model_loads() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = gpuserve("serve", "models/digits.pt2", "--device", "cpu", "--port", str(port))
    assert result.returncode == 1, result.stderr
    assert f"gpuserve: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "port 0 picks a free one" in result.stderr
    assert "loading digits" not in result.stderr


def test_a_model_file_and_a_list_of_models_conflict(tmp_path: Path) -> None:
    config = tmp_path / "many.toml"
    config.write_text('[[models]]\nname = "a"\npath = "a.pt2"\n')
    with pytest.raises(SystemExit) as stopped:
        main(["serve", "x.pt2", "--config", str(config)])
    assert "lists several ([[models]])" in str(stopped.value.code)
    with pytest.raises(SystemExit) as twice:
        main(["serve", "x.pt2", "--model", "y.pt2"])
    assert "give the model file once" in str(twice.value.code)


def test_init_from_the_command_line_prints_the_next_steps(tmp_path: Path) -> None:
    result = gpuserve("init", str(tmp_path / "nope.pt2"), "--config", str(tmp_path / "g.toml"))
    assert result.returncode == 1 and "model file not found" in result.stderr
