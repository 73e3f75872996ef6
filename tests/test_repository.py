"""The repository API: unload, load and reload models while serving, by name only."""

from __future__ import annotations

import asyncio
import gc
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

from gpuserve.config import ModelSettings, Settings
from gpuserve.http import create_app

from .helpers import ServerProcess, serving, wait_ready

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
    # The protocol's readiness of an unloaded model: not ready, a 4xx, not an error.
    unready = await client.get("/v2/models/b/ready")
    assert unready.status_code == 400 and unready.json() == {"name": "b", "ready": False}
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
    assert 'gpuserve_ready{model="a",version="1"} 1.0' in metrics


async def test_a_failed_reload_keeps_the_old_copy_serving(
    client: httpx.AsyncClient, folder: Path
) -> None:
    (folder / "a.pt2").write_bytes(b"not a model")
    refused = await client.post("/v2/repository/models/a/load")
    assert refused.status_code == 400 and "failed to load 'a'" in refused.json()["error"]
    # The reason itself, not what the failed copy's stop said of it afterwards.
    assert "shutting down" not in refused.json()["error"]
    assert "a.pt2" in refused.json()["error"]
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


class Wide(torch.nn.Module):
    """32 MiB of weights: a leak of one copy per cycle would show in the process's RSS."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2048, 4096)
        self.head = torch.nn.Linear(4096, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x))


def rss_bytes() -> int:
    """The process's resident memory, after handing glibc's free heap back to the system:
    without the trim, what other tests left fragmented in the allocator's arenas reads as
    growth (once 64 MiB in a full run, where the test alone grows by 0-3 MiB)."""
    import ctypes
    import ctypes.util
    import os

    libc = ctypes.util.find_library("c")
    if libc is not None:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if trim is not None:
            trim(0)
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_unload_and_load_cycles_under_traffic_fail_nothing_and_leak_nothing(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        Wide().eval(), (torch.randn(2, 2048),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(tmp_path / "wide.pt2"))
    export(tmp_path / "small.pt2", 0)
    models = [
        ModelSettings(name="small", path=tmp_path / "small.pt2", tune_batch_size=False),
        ModelSettings(name="wide", path=tmp_path / "wide.pt2", tune_batch_size=False),
    ]
    app = create_app(Settings(device="cpu", models=models, repository_api=True))
    async with serving(app) as client:
        statuses: list[int] = []
        cycling = True

        async def traffic() -> None:  # the model that stays, asked all along
            while cycling:
                response = await client.post("/models/small/predict", json=ROW)
                statuses.append(response.status_code)

        clients = [asyncio.ensure_future(traffic()) for _ in range(4)]
        try:
            # One cycle first: allocators keep what they were given once, leak or not.
            for url in ("/v2/repository/models/wide/unload", "/v2/repository/models/wide/load"):
                assert (await client.post(url)).status_code == 200
            start = rss_bytes()
            for _ in range(5):
                assert (await client.post("/v2/repository/models/wide/unload")).status_code == 200
                assert (await client.post("/v2/repository/models/wide/load")).status_code == 200
            grown = rss_bytes() - start
        finally:
            cycling = False
            await asyncio.gather(*clients)
        assert set(statuses) == {200} and len(statuses) > 4
        answer = await client.post("/models/wide/predict", json={"inputs": [0.0] * 2048})
        assert answer.status_code == 200
    gc.unfreeze()  # freeze_gc froze this test process's heap, as it does a server's
    # Five leaked copies would be 160 MiB and more.
    assert grown < 48 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB over 5 unload/load cycles"


async def test_a_version_rollout_under_load_fails_no_request(
    folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    repository = tmp_path_factory.mktemp("repository")
    (repository / "a" / "2").mkdir(parents=True)
    export(repository / "a" / "2" / "model.pt2", 5)
    (repository / "a" / "x").mkdir()  # not a version: ignored
    export(repository / "a" / "x" / "model.pt2", 6)
    app = create_app(settings(folder, repository_dir=repository))
    async with serving(app) as client:
        meta = (await client.get("/v2/models/a")).json()
        assert meta["versions"] == ["1"]
        tensor = {"name": meta["inputs"][0]["name"], "shape": [1, 10], "datatype": "FP32"}
        infer = {"inputs": [{**tensor, "data": [1.0] * 10}]}
        v1_answer = (await client.post("/v2/models/a/infer", json=infer)).json()
        answers: list[tuple[int, str]] = []
        rolling = True

        async def traffic(url: str) -> None:  # the route without a version, asked all along
            while rolling:
                if url.startswith("/v2"):
                    response = await client.post(url, json=infer)
                    version = response.json().get("model_version", "")
                else:
                    response, version = await client.post(url, json=ROW), "-"
                answers.append((response.status_code, version))

        urls = ["/v2/models/a/infer"] * 4 + ["/models/a/predict"] * 4
        clients = [asyncio.ensure_future(traffic(url)) for url in urls]
        try:
            await asyncio.sleep(0.05)
            loaded = await client.post("/v2/repository/models/a/versions/2/load")
            assert loaded.status_code == 200, loaded.text
            served = (await client.get("/v2/models/a")).json()["versions"]
            await asyncio.sleep(0.05)
            unloaded = await client.post("/v2/repository/models/a/versions/1/unload")
            assert unloaded.status_code == 200, unloaded.text
            await asyncio.sleep(0.05)
        finally:
            rolling = False
            await asyncio.gather(*clients)
        assert {status for status, _ in answers} == {200}, answers
        versions = [version for _, version in answers if version != "-"]
        assert versions[0] == "1" and versions[-1] == "2" and len(answers) > 16
        assert served == ["1", "2"]
        v2_answer = (await client.post("/v2/models/a/infer", json=infer)).json()
        assert v2_answer["model_version"] == "2"
        assert not np.allclose(v1_answer["outputs"][0]["data"], v2_answer["outputs"][0]["data"])
        assert (await client.get("/v2/models/a")).json()["versions"] == ["2"]
        gone = await client.post("/v2/models/a/versions/1/infer", json=infer)
        assert gone.status_code == 503 and "version 1 is unloaded" in gone.json()["error"]
        entries = (await client.post("/v2/repository/index")).json()
        states = {(e["name"], e["version"]): e["state"] for e in entries}
        assert states == {("a", "1"): "UNAVAILABLE", ("a", "2"): "READY", ("b", "1"): "READY"}
        refused = await client.post("/v2/repository/models/a/versions/x/load")
        assert refused.status_code == 404
        metrics = (await client.get("/metrics")).text
        assert 'gpuserve_ready{model="a",version="2"} 1.0' in metrics
        assert 'gpuserve_ready{model="a",version="1"} 0.0' in metrics


async def test_the_repository_api_reads_its_bodies_as_triton_s_does(
    folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    repository = tmp_path_factory.mktemp("repository")
    export(repository / "extra.pt2", 3)
    async with serving(create_app(settings(folder, repository_dir=repository))) as client:
        # On disk, never loaded: listed, unavailable; {"ready": true} leaves it out.
        listed = (await client.post("/v2/repository/index")).json()
        assert {"name": "extra", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in (
            listed
        )
        ready = (await client.post("/v2/repository/index", json={"ready": True})).json()
        assert {entry["name"] for entry in ready} == {"a", "b"}
        for body in (b"not json", b"[1]", b'{"ready": "yes"}'):
            refused = await client.post("/v2/repository/index", content=body)
            assert refused.status_code == 400, body
        # Load parameters are refused, not ignored; so is a body that is not JSON.
        overridden = await client.post(
            "/v2/repository/models/a/load", json={"parameters": {"config": "{}"}}
        )
        assert overridden.status_code == 400 and "config" in overridden.json()["error"]
        garbled = await client.post("/v2/repository/models/a/load", content=b"{oops")
        assert garbled.status_code == 400
        # Unloading what is not loaded succeeds, as Triton's does; an unknown name is 404.
        for _ in range(2):
            assert (await client.post("/v2/repository/models/b/unload")).status_code == 200
        assert (await client.post("/v2/repository/models/b/versions/1/unload")).status_code == 200
        assert (await client.post("/v2/repository/models/nope/unload")).status_code == 404
        assert (await client.post("/v2/repository/models/a/versions/9/unload")).status_code == 404
