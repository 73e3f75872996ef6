"""`gpuserve init`: the starter config and spec it writes are what the server then reads."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import pytest
import torch

from gpuserve.config import ModelSettings, Settings
from gpuserve.core.errors import ModelLoadError
from gpuserve.model.starter import write_starter
from gpuserve.spec import ModelSpec


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def export(path: Path) -> Path:
    batch = torch.export.Dim("batch")
    program = torch.export.export(mlp().eval(), (torch.randn(2, 10),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def test_init_writes_a_config_the_server_reads_and_the_programs_spec(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    model = export(tmp_path / "models" / "mlp.pt2")
    config = tmp_path / "conf" / "gpuserve.toml"
    config.parent.mkdir()
    started = write_starter(model, config)
    assert started.config == config and started.spec == model.with_suffix(".json")
    spec = ModelSpec.from_file(model.with_suffix(".json"))
    assert spec.input.describe() == "float32[10]" and spec.output.describe() == "float32[3]"
    settings = Settings(config_file=config)
    assert settings.model.path == model  # written relative to the config's folder
    defaults = ModelSettings(path=model)
    assert settings.model.max_batch_size == defaults.max_batch_size
    # Every model setting a user may tune is listed, set or commented at its default.
    text = config.read_text()
    listed = {line.lstrip("# ").split(" =")[0] for line in text.splitlines() if " = " in line}
    skipped = {"path", "name", "factory", "factory_kwargs", "weights", "handler", "spec"}
    assert set(ModelSettings.model_fields) - skipped <= listed
    # ... and uncommenting a line gives a valid setting at its default.
    for line in text.splitlines():
        if line.startswith("# ") and " = " in line and '"..."' not in line:
            key, value = line[2:].split("#")[0].split(" = ")
            parsed = tomllib.loads(f"{key.strip()} = {value.strip()}")
            assert parsed[key.strip()] == getattr(defaults, key.strip()), line


def test_init_never_overwrites(tmp_path: Path) -> None:
    model = export(tmp_path / "mlp.pt2")
    config = tmp_path / "gpuserve.toml"
    config.write_text("port = 1\n")
    with pytest.raises(FileExistsError, match="exists already"):
        write_starter(model, config)
    assert config.read_text() == "port = 1\n"
    # A spec that is there already is kept as it is.
    model.with_suffix(".json").write_text('{"mine": true}')
    started = write_starter(model, tmp_path / "other.toml")
    assert started.spec is None and model.with_suffix(".json").read_text() == '{"mine": true}'


def test_init_for_torchscript_writes_a_template_to_fill_in(tmp_path: Path) -> None:
    model = tmp_path / "mlp.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(mlp()), str(model))
    started = write_starter(model, tmp_path / "gpuserve.toml")
    assert started.spec == model.with_suffix(".json")
    assert any("TorchScript keeps no shapes" in step for step in started.todo)
    ModelSpec.from_file(model.with_suffix(".json"))  # valid, to be edited


def test_init_names_a_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model file not found"):
        write_starter(tmp_path / "nope.pt2", tmp_path / "gpuserve.toml")
    assert not (tmp_path / "gpuserve.toml").exists()
