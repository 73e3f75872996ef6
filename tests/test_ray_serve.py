"""gpuserve on Ray Serve, for real: a local cluster of a head and two worker nodes (one cluster
for this module), replicas placed on both workers, HTTP through Ray's proxy on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from sklearn.datasets import load_digits

from gpuserve.config import ModelSettings, RaySettings, Settings
from gpuserve.model.loading import load_model

from .helpers import CPU, ROOT, free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
from ray.cluster_utils import Cluster  # noqa: E402

from gpuserve import ray_serve  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def cluster() -> Iterator[int]:
    """A head node and two worker nodes, each worker with one `gpuserve_slot`; yields the
    port of Serve's HTTP proxy."""
    # A short folder: Ray's unix sockets live under it, and their paths are capped at 107 bytes.
    home = tempfile.mkdtemp(prefix="gsray", dir="/tmp")
    names = ("HOME", "RAY_TMPDIR", "RAY_USAGE_STATS_ENABLED")
    saved = {key: os.environ.get(key) for key in names}
    os.environ.update({"HOME": home, "RAY_TMPDIR": home, "RAY_USAGE_STATS_ENABLED": "0"})
    # Ray keeps its sessions under RAY_TMPDIR/ray, and expects that folder to exist.
    os.makedirs(os.path.join(home, "ray"))
    local = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "temp_dir": os.path.join(home, "ray"),
            "include_dashboard": False,
        },
    )
    for _ in range(2):
        local.add_node(num_cpus=1, resources={"gpuserve_slot": 1})
    try:
        ray.init(address=local.address)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        local.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(home, ignore_errors=True)


def settings(demo_model: Path, **ray_options: Any) -> Settings:
    model = ModelSettings(path=demo_model.resolve(), max_batch_size=16)
    return Settings(device="cpu", model=model, ray=RaySettings(**ray_options))


def test_replicas_on_both_worker_nodes_answer_over_http(cluster: int, demo_model: Path) -> None:
    # Each replica needs the one slot a worker node has: two running replicas are on two nodes.
    placed = settings(demo_model, num_gpus=0, num_cpus=0, resources={"gpuserve_slot": 1})
    placed = placed.model_copy(update={"ray": placed.ray.model_copy(update={"num_replicas": 2})})
    serve.run(ray_serve.deployment(placed), name="gpuserve", route_prefix="/")
    status = serve.status().applications["gpuserve"].deployments["gpuserve"]
    assert status.replica_states == {"RUNNING": 2}
    assert ray.available_resources().get("gpuserve_slot", 0) == 0  # both nodes' slots taken
    assert ray.cluster_resources()["gpuserve_slot"] == 2

    images = load_digits().data[:8].astype(np.float32)
    handler = load_model(ModelSettings(path=demo_model), CPU)
    expected = [handler.postprocess(row) for row in handler(list(images))]
    url = f"http://127.0.0.1:{cluster}"
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health/ready").json()["status"] == "ready"
        for image, want in zip(images, expected, strict=True):
            got = client.post("/predict", json={"inputs": image.tolist()}).json()["outputs"]
            assert got["label"] == want["label"]
            np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-6)
        bad = client.post("/predict", json={"inputs": [1, 2]})
        assert bad.status_code == 422 and "expected float32[64]" in bad.json()["error"]
        v2 = client.get("/v2/models/digits/ready")
        assert v2.status_code == 200
    serve.delete("gpuserve")


def test_autoscaling_runs_on_ongoing_requests(cluster: int, demo_model: Path) -> None:
    scaled = settings(demo_model, num_gpus=0, num_cpus=0, min_replicas=1, max_replicas=2)
    serve.run(ray_serve.deployment(scaled), name="scaled", route_prefix="/scaled")
    details = serve.status().applications["scaled"].deployments["gpuserve"]
    assert details.status == "HEALTHY"
    with httpx.Client(timeout=60) as client:
        response = client.post(
            f"http://127.0.0.1:{cluster}/scaled/predict", json={"inputs": [0.0] * 64}
        )
        assert response.status_code == 200 and response.json()["model"] == "digits"
    serve.delete("scaled")


def test_the_kuberay_manifest_holds_what_serve_build_generates(tmp_path: Path) -> None:
    generated = tmp_path / "serve-config.yaml"
    subprocess.run(
        [
            str(Path(sys.executable).with_name("serve")),
            "build",
            "gpuserve_app:app",
            "--app-dir",
            "deploy/ray",
            "-o",
            str(generated),
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
        env={
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "GPUSERVE_CONFIG_FILE": "configs/ray.toml",
        },
    )
    built = yaml.safe_load(generated.read_text())
    manifest = yaml.safe_load((ROOT / "deploy" / "ray" / "rayservice.yaml").read_text())
    deployed = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    for config in (built, deployed):
        config["applications"][0].pop("name")  # serve build names it app1; the manifest renames
    assert deployed == built
    (replica,) = deployed["applications"][0]["deployments"]
    assert replica["ray_actor_options"]["num_gpus"] == 1.0
    assert replica["autoscaling_config"]["target_ongoing_requests"] == 32.0
