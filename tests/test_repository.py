"""The repository API: unload, load and reload models while serving, by name only."""

from __future__ import annotations

import asyncio
import shutil
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton

from gpuserve.app import create_app
from gpuserve.config import ModelSettings, Settings

from .conftest import ServerProcess
from .test_app import serving
from .test_socket import wait_ready

pytestmark = pytest.mark.anyio

ROW = {"inputs": [1.0] * 10}


def export(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    batch = torch.export.Dim("batch")
    program = torch.export.export(model.eval(), (torch.randn(2, 10),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def settings(folder: Path, **extra: Any) -> Settings:
    models = [
        ModelSettings(name="a", path=folder / "a.pt2", freeze_gc=False, tune_batch_size=False),
        ModelSettings(name="b", path=folder / "b.pt2", freeze_gc=False, tune_batch_size=False),
    ]
    return Settings(device="cpu", models=models, repository_api=True, **extra)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    export(tmp_path / "a.pt2", 0)
    export(tmp_path / "b.pt2", 1)
    return tmp_path


@pytest.fixture
async def client(folder: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(create_app(settings(folder))) as client:
        yield client


async def index(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    response = await client.post("/v2/repository/index")
    assert response.status_code == 200
    return {entry["name"]: entry for entry in response.json()}


async def test_the_api_is_off_unless_asked_for(folder: Path) -> None:
    off = settings(folder).model_copy(update={"repository_api": False})
    async with serving(create_app(off)) as client:
        assert (await client.post("/v2/repository/index")).status_code == 404
        assert (await client.post("/v2/repository/models/a/unload")).status_code == 404
        assert "model_repository" not in (await client.get("/v2")).json()["extensions"]


async def test_unload_then_load_again(client: httpx.AsyncClient) -> None:
    assert "model_repository" in (await client.get("/v2")).json()["extensions"]
    states = await index(client)
    assert {name: e["state"] for name, e in states.items()} == {"a": "READY", "b": "READY"}
    app = client._transport.app  # type: ignore[attr-defined]
    held = weakref.ref(app.state.models.get("b").model)
    assert (await client.post("/v2/repository/models/b/unload")).status_code == 200
    assert held() is None  # the unloaded model's memory is released, not kept somewhere
    assert (await index(client))["b"]["state"] == "UNAVAILABLE"
    gone = await client.post("/models/b/predict", json=ROW)
    assert gone.status_code == 503 and "unloaded" in gone.json()["error"]
    ready = (await client.get("/health/ready")).json()
    assert ready["status"] == "ready" and ready["models"]["b"] == {"status": "unloaded"}
    assert (await client.post("/models/a/predict", json=ROW)).status_code == 200
    assert (await client.post("/v2/repository/models/b/load")).status_code == 200
    assert (await index(client))["b"]["state"] == "READY"
    assert (await client.post("/models/b/predict", json=ROW)).status_code == 200
    assert (await client.post("/v2/repository/models/nope/load")).status_code == 404
    assert (await client.post("/v2/repository/models/nope/unload")).status_code == 404


async def test_a_reload_under_load_fails_no_request_and_serves_the_new_weights(
    client: httpx.AsyncClient, folder: Path
) -> None:
    before = (await client.post("/models/a/predict", json=ROW)).json()["outputs"]
    export(folder / "a.pt2", 7)  # new weights at the configured source
    statuses: list[int] = []
    reloading = True

    async def traffic() -> None:
        while reloading:
            statuses.append((await client.post("/models/a/predict", json=ROW)).status_code)

    clients = [asyncio.ensure_future(traffic()) for _ in range(8)]
    try:
        reload = await client.post("/v2/repository/models/a/load")
    finally:
        reloading = False
        await asyncio.gather(*clients)
    assert reload.status_code == 200
    assert len(statuses) > 8 and set(statuses) == {200}, set(statuses)
    after = (await client.post("/models/a/predict", json=ROW)).json()["outputs"]
    assert not np.allclose(before, after)
    metrics = (await client.get("/metrics")).text
    assert 'gpuserve_ready{model="a"} 1.0' in metrics


async def test_a_failed_reload_keeps_the_old_copy_serving(
    client: httpx.AsyncClient, folder: Path
) -> None:
    (folder / "a.pt2").write_bytes(b"not a model")
    refused = await client.post("/v2/repository/models/a/load")
    assert refused.status_code == 400 and "failed to load 'a'" in refused.json()["error"]
    assert (await client.post("/models/a/predict", json=ROW)).status_code == 200
    assert (await index(client))["a"]["state"] == "READY"


async def test_the_repository_folder_serves_models_by_name_only(
    folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    repository = tmp_path_factory.mktemp("repository")
    export(repository / "extra.pt2", 3)
    shutil.copy(folder / "a.pt2", repository.parent / "outside.pt2")
    app = create_app(settings(folder, repository_dir=repository))
    async with serving(app) as client:
        assert (await client.post("/models/extra/predict", json=ROW)).status_code == 404
        assert (await client.post("/v2/repository/models/extra/load")).status_code == 200
        answer = await client.post("/models/extra/predict", json=ROW)
        assert answer.status_code == 200 and len(answer.json()["outputs"]) == 3
        assert (await index(client))["extra"]["state"] == "READY"
        for name in ("outside", "..%2Foutside", "%2E%2E", ".hidden", "a b"):
            refused = await client.post(f"/v2/repository/models/{name}/load")
            assert refused.status_code == 404, name


async def test_keys_are_needed_when_set(folder: Path) -> None:
    key = "a-key-of-sixteen-chars"
    app = create_app(settings(folder, api_keys=[key]))
    async with serving(app) as client:
        assert (await client.post("/v2/repository/index")).status_code == 401
        keyed = {"authorization": f"Bearer {key}"}
        assert (await client.post("/v2/repository/index", headers=keyed)).status_code == 200


def test_tritonclient_lists_unloads_and_loads(folder: Path) -> None:
    config = folder / "repo.toml"
    config.write_text(
        "repository_api = true\n"
        '[[models]]\nname = "a"\npath = "a.pt2"\n'
        '[[models]]\nname = "b"\npath = "b.pt2"\n'
    )
    with ServerProcess("--config", str(config), "--device", "cpu") as server:
        wait_ready(server.url)
        client = triton.InferenceServerClient(url=urlsplit(server.url).netloc)
        try:
            names = {entry["name"]: entry["state"] for entry in client.get_model_repository_index()}
            assert names == {"a": "READY", "b": "READY"}
            client.unload_model("b")
            assert not client.is_model_ready("b")
            client.load_model("b")
            assert client.is_model_ready("b")
        finally:
            client.close()
        assert server.stop() == 0
