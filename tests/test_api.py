"""gpuserve.serve: a module in memory, a file or a Handler subclass, served in one call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import gpuserve
from gpuserve.api import configure
from gpuserve.handler import Handler
from gpuserve.http import create_app

from .helpers import serving

pytestmark = pytest.mark.anyio

SPEC = {"input": {"name": "x", "shape": [10]}, "output": {"shape": [3]}}


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


class Doubler(Handler):
    """Brings its own model: no file, no factory."""

    def load(self, device: torch.device) -> Any:
        return lambda batch: batch * 2


def rows(n: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(0).standard_normal((n, 10)).astype(np.float32)


async def answers(settings_and_loader: tuple[Any, Any], x: np.ndarray[Any, Any]) -> Any:
    settings, loader = settings_and_loader
    async with serving(create_app(settings, loader=loader)) as client:
        response = await client.post("/predict", json={"instances": x.tolist()})
        assert response.status_code == 200, response.text
        return response.json()


async def test_a_module_in_memory_is_served_with_its_own_answers() -> None:
    module = mlp()
    x = rows(5)
    body = await answers(configure(module, SPEC, device="cpu", freeze_gc=False), x)
    assert body["model"] == "sequential"
    expected = module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(body["outputs"], expected, rtol=1e-6, atol=1e-6)


async def test_a_handler_subclass_is_served_with_its_own_load() -> None:
    x = rows(2)
    body = await answers(configure(Doubler, SPEC | {"output": {"shape": [10]}}, device="cpu"), x)
    assert body["model"] == "doubler"
    np.testing.assert_allclose(body["outputs"], x * 2, rtol=1e-6)


async def test_a_file_is_served_with_the_spec_its_program_implies(tmp_path: Path) -> None:
    path = tmp_path / "mlp.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(mlp().eval(), (torch.randn(2, 10),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    x = rows(3)
    body = await answers(configure(path, device="cpu", max_batch_size=8), x)
    assert body["model"] == "mlp"
    expected = mlp()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(body["outputs"], expected, rtol=1e-5, atol=1e-6)


def test_keywords_are_server_or_model_settings_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPUSERVE_PORT", "9100")
    monkeypatch.setenv("GPUSERVE_MODEL__MAX_WAIT_MS", "7")
    settings, _ = configure(mlp(), SPEC, name="m", max_batch_size=4, port=9200)
    assert settings.port == 9200 and settings.model.max_batch_size == 4
    assert settings.model.max_wait_ms == 7.0 and settings.model.key == "m"
    settings, _ = configure(mlp(), SPEC)
    assert settings.port == 9100


def test_what_cannot_be_served_is_refused_with_the_reason() -> None:
    with pytest.raises(TypeError, match="cannot serve a int"):
        configure(42, SPEC)
    with pytest.raises(TypeError, match="needs a spec"):
        configure(mlp())
    with pytest.raises(ValueError, match="max_batch_size"):
        configure(mlp(), SPEC, max_batch_size=0)


def test_serve_is_the_package_s_own() -> None:
    assert gpuserve.serve.__module__ == "gpuserve.api"
