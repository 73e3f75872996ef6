"""Cold starts: an AOTInductor package served with no compile at start, and a compiled
model's second start reusing torch's caches from `compile_cache_dir`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch

from gpuserve.config import ModelSettings, Settings
from gpuserve.core.errors import ModelLoadError
from gpuserve.http import create_app
from gpuserve.model import sources
from gpuserve.model.loading import load_model

from .helpers import CPU, DEMO, FAKE_SPEC, FakeModel, fake_loader, serving, wait_for_status

pytestmark = pytest.mark.anyio

SPEC = {"name": "lin", "input": {"shape": [4]}, "output": {"shape": [3]}}


def module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3).eval()


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An AOTInductor package of `module()` for the CPU, any batch size to 64, with its spec."""
    folder = tmp_path_factory.mktemp("aoti")
    batch = torch.export.Dim("batch", min=1, max=64)
    with warnings.catch_warnings():  # torch's own deprecations, inside its compile
        warnings.simplefilter("ignore")
        program = torch.export.export(module(), (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=str(folder / "lin.pt2")
        )
    (folder / "lin.json").write_text(json.dumps(SPEC))
    return Path(path)


def rows(n: int) -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(n)
    return [rng.standard_normal(4).astype(np.float32) for _ in range(n)]


@pytest.mark.integration
def test_an_aoti_package_serves_what_the_module_computes(package: Path) -> None:
    assert sources.is_aoti_package(package)
    runner = load_model(ModelSettings(path=package, tune_batch_size=False), CPU)
    for size in (1, 5, 64):
        items = rows(size)
        expected = module()(torch.from_numpy(np.stack(items))).detach().numpy()
        np.testing.assert_allclose(np.stack(runner(items)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.integration
async def test_an_aoti_package_answers_over_http(package: Path) -> None:
    model = ModelSettings(path=package, tune_batch_size=False, freeze_gc=False)
    app = create_app(Settings(device="cpu", model=model))
    async with serving(app) as client:
        answer = await client.post("/predict", json={"inputs": [1, 2, 3, 4]})
        ready = (await client.get("/health/ready")).json()
    assert answer.status_code == 200, answer.text
    expected = module()(torch.tensor([[1.0, 2, 3, 4]])).detach().numpy()[0]
    np.testing.assert_allclose(answer.json()["outputs"], expected, rtol=1e-5)
    assert ready["status"] == "ready"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"compile": "default"}, 'compile = "off"'),
        ({"precision": "bf16"}, 'precision = "fp32"'),
    ],
)
def test_an_aoti_package_is_served_as_compiled(
    package: Path, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(ModelSettings(path=package, **settings), CPU)


@pytest.mark.integration
def test_an_aoti_package_without_a_spec_says_to_write_one(package: Path, tmp_path: Path) -> None:
    alone = tmp_path / "alone.pt2"
    alone.write_bytes(package.read_bytes())
    with pytest.raises(ModelLoadError, match=r"does not describe its inputs.*alone\.json"):
        load_model(ModelSettings(path=alone), CPU)


def test_a_package_compiled_for_another_device_kind_is_refused_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zipfile

    path = tmp_path / "gpu.pt2"  # the layout of a package; its code is never run here
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("gpu/data/aotinductor/model/x.wrapper.so", b"")

    class CompiledForCuda:
        def get_metadata(self) -> dict[str, str]:
            return {"AOTI_DEVICE_KEY": "cuda"}

    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *a, **k: CompiledForCuda())
    with pytest.raises(ModelLoadError, match="compiled for cuda, and runs only there"):
        sources.load_module(ModelSettings(path=path), torch.device("cpu"))


# A compiled model loaded and warmed up in a fresh process: prints inductor's cache counters.
_START = """
import json, sys
from pathlib import Path
import torch
from torch._dynamo.utils import counters
from gpuserve.config import ModelSettings
from gpuserve.handler import Handler
from gpuserve.model.device import DeviceInfo
from gpuserve.model.runner import Runner
from gpuserve.spec import ModelSpec, TensorSpec

torch.manual_seed(0)
spec = ModelSpec(name="lin", input=TensorSpec(shape=(4,)), output=TensorSpec(shape=(3,)))
settings = ModelSettings(
    name="lin", path=Path("unused.pt2"), compile="default", max_batch_size=2,
    tune_batch_size=False, compile_cache_dir=Path(sys.argv[1]),
)
device = DeviceInfo(device="cpu", kind="cpu", name="cpu", reason="test")
runner = Runner(Handler(spec, device, settings, module=torch.nn.Linear(4, 3).eval()))
runner.setup()
runner.warm()
print(json.dumps(dict(counters["inductor"])))
"""


@pytest.mark.integration
def test_a_compiled_models_second_start_reuses_the_compile_cache(tmp_path: Path) -> None:
    cache = tmp_path / "compile-cache"
    # Each start with torch's default folder somewhere new, as in a fresh container.
    starts = []
    for run in range(2):
        env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"default-{run}")}
        done = subprocess.run(
            [sys.executable, "-c", _START, str(cache)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**_environment(), **env},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        starts.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = starts
    assert first.get("fxgraph_cache_miss", 0) >= 2 and not first.get("fxgraph_cache_hit")
    assert second.get("fxgraph_cache_hit", 0) == first["fxgraph_cache_miss"]
    assert not second.get("fxgraph_cache_miss")
    assert any(cache.iterdir())  # the caches are in the folder named


def _environment() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}


@pytest.mark.parametrize(
    ("compile_mode", "phase"), [("default", "compiling"), ("off", "warming up")]
)
async def test_readiness_says_compiling_while_a_compiled_model_warms_up(
    compile_mode: str, phase: str
) -> None:
    warming, release = threading.Event(), threading.Event()

    class SlowToWarm(FakeModel):
        def warm(self) -> None:  # where a compiled model compiles its graphs
            warming.set()
            assert release.wait(timeout=30)

    model = ModelSettings(path=DEMO, compile=compile_mode, freeze_gc=False)
    app = create_app(Settings(device="cpu", model=model), loader=fake_loader(SlowToWarm(FAKE_SPEC)))
    async with serving(app, wait_ready=False) as client:
        assert await anyio.to_thread.run_sync(warming.wait, 30)
        body = (await client.get("/health/ready")).json()
        release.set()
        await wait_for_status(client, "ready")
    assert body["models"]["digits"]["progress"]["phase"] == phase
