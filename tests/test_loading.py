"""Loading real model files: torch.export and TorchScript, and each way a load can fail."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gpuserve.config import ModelSettings
from gpuserve.core.errors import ModelLoadError
from gpuserve.model.loading import load_model
from gpuserve.spec import ModelSpec, TensorSpec

from .helpers import CPU

SPEC = ModelSpec(
    name="double",
    input=TensorSpec(shape=(3,)),
    output=TensorSpec(shape=(3,)),
)


class Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def export_to(
    path: Path, spec: ModelSpec = SPEC, module: torch.nn.Module | None = None
) -> ModelSettings:
    batch = torch.export.Dim("batch", min=1, max=1024)
    module = module if module is not None else Double()
    program = torch.export.export(module, (torch.zeros(2, 3),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    spec.to_file(path.with_suffix(".json"))
    return ModelSettings(path=path)


def test_an_exported_program_loads_and_runs(tmp_path: Path) -> None:
    handler = load_model(export_to(tmp_path / "double.pt2"), CPU)
    out = handler([np.array([1, 2, 3], np.float32), np.array([4, 5, 6], np.float32)])
    assert [row.tolist() for row in out] == [[2.0, 4.0, 6.0], [8.0, 10.0, 12.0]]
    assert handler.spec.name == "double"


def test_the_load_line_times_the_whole_load_and_names_where_the_model_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from gpuserve.model import loading

    caplog.set_level(logging.INFO, logger="gpuserve.model.loading")
    settings = export_to(tmp_path / "double.pt2")
    settings.path.with_suffix(".json").unlink()  # inferred: the program is read first
    slow_read = loading.load_program

    def load_program(path: Path) -> object:
        time.sleep(0.3)
        return slow_read(path)

    monkeypatch.setattr(loading, "load_program", load_program)
    load_model(settings, CPU)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded")]
    assert line.startswith(f"loaded double from {settings.path} (0.0 MiB) on cpu in ")
    assert float(line.rsplit(" in ", 1)[1].rstrip("s")) >= 0.3
    caplog.clear()
    loading.build_model(
        ModelSettings(path=settings.path, spec=SPEC.model_dump()), CPU, module=Double()
    )
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded")]
    assert line.startswith("loaded double from a Double in memory on cpu in ")


def test_a_torchscript_module_loads_and_runs(tmp_path: Path) -> None:
    path = tmp_path / "double.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(Double()), str(path))
    SPEC.to_file(path.with_suffix(".json"))
    handler = load_model(ModelSettings(path=path, name="renamed"), CPU)
    assert [row.tolist() for row in handler([np.ones(3, np.float32)])] == [[2.0, 2.0, 2.0]]
    assert handler.spec.name == "renamed"


def test_the_demo_model_loads_through_the_same_loader(demo_model: Path) -> None:
    handler = load_model(ModelSettings(path=demo_model), CPU)
    (row,) = handler([np.zeros(64, np.float32)])
    result = handler.postprocess(row)
    assert set(result) == {"label", "probabilities"}
    assert sum(result["probabilities"]) == pytest.approx(1.0, abs=1e-5)


def test_a_missing_model_file_is_named(tmp_path: Path) -> None:
    SPEC.to_file(tmp_path / "gone.json")
    with pytest.raises(ModelLoadError, match="model file not found"):
        load_model(ModelSettings(path=tmp_path / "gone.pt2"), CPU)


def test_a_missing_model_file_is_named_even_without_its_spec(tmp_path: Path) -> None:
    # Neither nope.pt2 nor nope.json exists: the file asked for is what is missing.
    with pytest.raises(ModelLoadError) as caught:
        load_model(ModelSettings(path=tmp_path / "nope.pt2"), CPU)
    assert caught.value.message.startswith("model file not found:")
    assert (
        str(tmp_path / "nope.pt2") in caught.value.message
        and "nope.json" not in caught.value.message
    )


def test_a_missing_spec_is_named(tmp_path: Path) -> None:
    # TorchScript keeps no shapes to infer one from (a .pt2 program does: test_sources.py).
    path = tmp_path / "double.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(Double()), str(path))
    with pytest.raises(ModelLoadError, match=r"model spec not found: .*double\.json"):
        load_model(ModelSettings(path=path), CPU)
    # A spec named in the settings is never replaced by an inferred one.
    settings = export_to(tmp_path / "double.pt2").model_copy(update={"spec": tmp_path / "x.json"})
    with pytest.raises(ModelLoadError, match=r"model spec not found: .*x\.json"):
        load_model(settings, CPU)


@pytest.mark.parametrize("suffix", [".pt2", ".pt"])
def test_a_corrupt_file_is_a_clear_load_error(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"definitely not a model")
    SPEC.to_file(path.with_suffix(".json"))
    with pytest.raises(ModelLoadError, match=r"could not load .*corrupt"):
        load_model(ModelSettings(path=path), CPU)


def test_an_unknown_format_lists_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00")
    SPEC.to_file(path.with_suffix(".json"))
    with pytest.raises(ModelLoadError, match=r"unknown model format '\.onnx'.*\.pt2"):
        load_model(ModelSettings(path=path), CPU)


def test_a_spec_whose_input_does_not_fit_fails_at_warm_up(tmp_path: Path) -> None:
    wrong = SPEC.model_copy(update={"input": TensorSpec(shape=(5,))})
    with pytest.raises(ModelLoadError, match=r"warm-up batch failed.*float32\[5\]"):
        load_model(export_to(tmp_path / "double.pt2", wrong), CPU)


def test_a_spec_whose_output_does_not_fit_fails_at_warm_up(tmp_path: Path) -> None:
    wrong = SPEC.model_copy(update={"output": TensorSpec(shape=(4,))})
    with pytest.raises(ModelLoadError, match=r"output shape \[3\] does not match"):
        load_model(export_to(tmp_path / "double.pt2", wrong), CPU)


def test_reduced_precision_is_checked_at_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    settings = export_to(tmp_path / "linear.pt2", module=torch.nn.Linear(3, 3).eval())
    bf16 = settings.model_copy(update={"precision": "bf16", "precision_tolerance": 0.05})
    handler = load_model(bf16, CPU)
    assert handler.precision == "bf16"
    strict = settings.model_copy(update={"precision": "bf16", "precision_tolerance": 1e-9})
    with pytest.raises(ModelLoadError, match="differs from fp32"):
        load_model(strict, CPU)


def test_the_batch_size_is_tuned_at_load_unless_switched_off(tmp_path: Path) -> None:
    settings = export_to(tmp_path / "double.pt2").model_copy(update={"max_batch_size": 8})
    tuned = load_model(settings, CPU)
    assert tuned.preferred_batch_size in settings.warmup_batch_sizes
    fixed = load_model(settings.model_copy(update={"tune_batch_size": False}), CPU)
    assert fixed.preferred_batch_size is None


HANDLER = """
import numpy as np
import torch
from gpuserve.core.errors import InvalidInput
from gpuserve.handler import Handler

class Scaled(Handler):
    def load(self, device):
        return lambda x: x * 10

    def preprocess(self, instance):
        if instance.sum() < 0:
            raise InvalidInput("negative")
        return instance + 1

    def postprocess(self, row):
        return {"scaled": row}

class NotAHandler:
    pass
"""


def handler_settings(tmp_path: Path, module: str, cls: str) -> ModelSettings:
    (tmp_path / f"{module}.py").write_text(HANDLER)
    return ModelSettings.model_validate(
        {
            "name": "scaled",
            "handler": f"{module}:{cls}",
            "code_dir": tmp_path,
            "spec": {"input": {"shape": [3]}, "output": {"shape": [3]}},
        }
    )


def test_a_handler_class_brings_its_own_hooks(tmp_path: Path) -> None:
    handler = load_model(handler_settings(tmp_path, "scaled_handler", "Scaled"), CPU)
    assert handler.spec.name == "scaled"
    (row,) = handler([handler.preprocess(np.zeros(3, np.float32))])
    assert handler.postprocess(row)["scaled"].tolist() == [10.0, 10.0, 10.0]


def test_a_handler_that_is_not_a_handler_is_refused(tmp_path: Path) -> None:
    settings = handler_settings(tmp_path, "other_handler", "NotAHandler")
    with pytest.raises(ModelLoadError, match=r"not a subclass of gpuserve\.handler\.Handler"):
        load_model(settings, CPU)
