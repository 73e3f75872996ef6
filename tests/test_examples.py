"""Every example in examples/ is built, served from its own config, and checked against the
model called directly. `all.toml` serves the four from one server."""

from __future__ import annotations

import runpy
import shutil
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from gpuserve.app import create_app
from gpuserve.config import Settings

from .conftest import ROOT
from .test_app import serving

pytestmark = pytest.mark.anyio

EXAMPLES = ("torchscript_image", "export_regressor", "factory_safetensors", "tokens")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of examples/ with every model built, as the working directory of the configs."""
    root = tmp_path_factory.mktemp("examples")
    shutil.copytree(
        ROOT / "examples", root / "examples", ignore=shutil.ignore_patterns("artifacts")
    )
    for name in EXAMPLES:
        script = root / "examples" / name / "build.py"
        runpy.run_path(str(script), run_name=f"example_{name}")["build"](
            script.parent / "artifacts"
        )
    path = list(sys.path)
    yield root
    sys.path[:] = path  # the configs' code_dir entries


@pytest.fixture
async def client(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.chdir(workdir)
    settings = Settings(config_file=Path("examples/all.toml"), device="cpu")
    async with serving(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_config_names_its_model(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(workdir)
    settings = Settings(config_file=Path(f"examples/{name}/config.toml"))
    (model,) = settings.served_models
    assert model.key in {"cnn", "regressor", "scorer", "sentiment"}


async def predict(client: httpx.AsyncClient, model: str, instances: list[Any]) -> list[Any]:
    response = await client.post(f"/models/{model}/predict", json={"instances": instances})
    assert response.status_code == 200, response.text
    outputs: list[Any] = response.json()["outputs"]
    return outputs


async def test_the_torchscript_image_model(client: httpx.AsyncClient, workdir: Path) -> None:
    images = np.random.default_rng(0).integers(0, 17, (3, 1, 8, 8)).astype(np.float32)
    served = await predict(client, "cnn", images.tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(workdir / "examples/torchscript_image/artifacts/cnn.pt"))
    expected = torch.softmax(module(torch.from_numpy(images)), -1).detach().numpy()
    np.testing.assert_allclose([out["probabilities"] for out in served], expected, atol=1e-6)


async def test_the_exported_regressor(client: httpx.AsyncClient, workdir: Path) -> None:
    features = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    served = await predict(client, "regressor", features.tolist())
    program = torch.export.load(str(workdir / "examples/export_regressor/artifacts/regressor.pt2"))
    expected = program.module()(torch.from_numpy(features)).detach().numpy()
    np.testing.assert_allclose(served, expected, atol=1e-6)


async def test_the_factory_with_safetensors_weights(
    client: httpx.AsyncClient, workdir: Path
) -> None:
    from safetensors.torch import load_file

    x = np.random.default_rng(2).standard_normal((2, 16)).astype(np.float32)
    served = await predict(client, "scorer", x.tolist())
    folder = workdir / "examples/factory_safetensors"
    module = runpy.run_path(str(folder / "factory_model.py"))["build"](features=16, hidden=32)
    module.load_state_dict(load_file(str(folder / "artifacts/scorer.safetensors")))
    expected = torch.softmax(module(torch.from_numpy(x)), -1).detach().numpy()
    np.testing.assert_allclose([out["probabilities"] for out in served], expected, atol=1e-6)
    assert served[0]["label"] in {"low", "mid", "high"}


async def test_variable_length_tokens_batched_equal_each_alone(
    client: httpx.AsyncClient, workdir: Path
) -> None:
    rng = np.random.default_rng(3)
    # Lengths across three buckets; the long one must not change the short ones' answers.
    sequences = [rng.integers(2, 1000, n).tolist() for n in (3, 20, 5, 100, 12, 40, 1)]
    together = await predict(client, "sentiment", sequences)
    alone = [(await predict(client, "sentiment", [seq]))[0] for seq in sequences]
    for batched, single in zip(together, alone, strict=True):
        assert batched["label"] == single["label"]
        assert batched["score"] == pytest.approx(single["score"], abs=1e-5)

    folder = workdir / "examples/tokens"
    namespace = runpy.run_path(str(folder / "token_model.py"))
    from safetensors.torch import load_file

    module = namespace["build"]().eval()
    module.load_state_dict(load_file(str(folder / "artifacts/tokens.safetensors")))
    ids = torch.tensor([[namespace["CLS"], *sequences[0]]])
    with torch.inference_mode():
        probabilities = torch.softmax(module(ids, torch.ones_like(ids, dtype=torch.bool)), -1)
    assert together[0]["score"] == pytest.approx(float(probabilities.max()), abs=1e-5)

    metrics = (await client.get("/metrics")).text
    # With CLS, lengths 4, 21, 6, 101, 13, 41, 2 fall in 4 buckets (16, 32, 64, 128): the
    # 7-sequence request ran as 4 batches, then 7 batches of one.
    assert 'gpuserve_batch_size_count{model="sentiment"} 11.0' in metrics


async def test_token_input_beyond_its_bound_is_a_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/models/sentiment/predict", json={"inputs": [5] * 128})
    assert response.status_code == 422
    assert "at most [127]" in response.json()["error"]
    ready = (await client.get("/health/ready")).json()
    assert set(ready["models"]) == {"cnn", "regressor", "scorer", "sentiment"}
    assert ready["status"] == "ready"
