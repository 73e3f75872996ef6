"""Shared fixtures: the anyio backend, the demo model, and a small fake model for HTTP tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gpuserve.spec import ModelSpec, TensorSpec

from . import tiers
from .helpers import FAKE_SPEC, ROOT, FakeModel, SlowNet


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test gets its module's tier as a marker (`pytest -m unit`: the fast tier), unless
    it is marked integration itself."""
    for item in items:
        if item.get_closest_marker("integration") is None:
            item.add_marker(tiers.tier(item.module.__name__ if item.module else ""))


@pytest.fixture(autouse=True)
def _tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A unit test that reaches for the network or a process fails, saying so."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    with tiers.guard(monkeypatch):
        yield


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The demo model file; `make test` builds it first, this builds it if run bare."""
    path = ROOT / "models" / "digits.pt2"
    if not path.exists():
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "make_demo_model.py"),
                "--out",
                str(path.parent),
            ],
            check=True,
        )
    return path


@pytest.fixture
def fake_model() -> FakeModel:
    return FakeModel(FAKE_SPEC)


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slow") / "slow.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        SlowNet(rounds=5).eval(), (torch.zeros(2, 64),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(path))
    ModelSpec(
        name="slow",
        input=TensorSpec(shape=(64,), dtype="float32"),
        output=TensorSpec(shape=(10,), dtype="float32"),
    ).to_file(path.with_suffix(".json"))
    return path
