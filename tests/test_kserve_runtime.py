"""deploy/kserve/: the ClusterServingRuntime and InferenceService manifests hold only what
KServe's own API types define (checked field by field against the kserve package's models),
and the runtime's exact arguments serve a storage-initializer folder to KServe's clients."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .helpers import ROOT, ServerProcess, free_port, wait_ready

KSERVE = ROOT / "deploy" / "kserve"
# kserve's generated protobuf modules clash with tritonclient's in one process: its types are
# read in a process of their own.
CHECKER = ROOT / "tests" / "kserve_types.py"


def problems(document: dict[str, Any], kind: str) -> list[str]:
    """What in `document` KServe's API type `kind` does not define, or types otherwise."""
    done = subprocess.run(
        [sys.executable, str(CHECKER), kind],
        input=json.dumps(document),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found: list[str] = json.loads(done.stdout)
    return found


def manifest(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((KSERVE / name).read_text())
    return document


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("clusterservingruntime.yaml", "V1alpha1ClusterServingRuntime"),
        ("inferenceservice.yaml", "V1beta1InferenceService"),
    ],
)
def test_a_manifest_holds_only_what_kserves_types_define(name: str, kind: str) -> None:
    document = manifest(name)
    assert document["kind"] == kind.removeprefix("V1alpha1").removeprefix("V1beta1")
    assert problems(document, kind) == []


def test_the_check_finds_an_unknown_field_and_a_wrong_type() -> None:
    document = manifest("clusterservingruntime.yaml")
    document["spec"]["supportedModelFormat"] = []  # a typo of supportedModelFormats
    document["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    found = problems(document, "V1alpha1ClusterServingRuntime")
    assert any("supportedModelFormat: no such field" in p for p in found)
    assert any("containerPort: '8080' is not int" in p for p in found)


def test_the_runtime_serves_pytorch_formats_on_kserves_ports_with_its_probes() -> None:
    spec = manifest("clusterservingruntime.yaml")["spec"]
    formats = {entry["name"]: entry for entry in spec["supportedModelFormats"]}
    assert {"pytorch", "pytorch-pt2"} <= set(formats)
    # Chosen by itself for .pt2 only: a `pytorch` model stored for TorchServe is a .mar.
    assert formats["pytorch-pt2"]["autoSelect"] and not formats["pytorch"]["autoSelect"]
    assert set(spec["protocolVersions"]) == {"v1", "v2", "grpc-v2"}
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the name KServe looks for
    args = container["args"]
    assert args[:2] == ["serve", "/mnt/models"] and "{{.Name}}" in args
    assert args[args.index("--port") + 1] == "8080"  # KServe routes HTTP to 8080
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    isvc = manifest("inferenceservice.yaml")["spec"]["predictor"]["model"]
    assert isvc["runtime"] == manifest("clusterservingruntime.yaml")["metadata"]["name"]
    assert isvc["modelFormat"]["name"] in formats


def runtime_command(folder: Path, name: str, http: int, grpc: int) -> list[str]:
    """The runtime's container arguments as KServe fills them in, with the storage folder
    and the two ports taken from this test (the only values replaced)."""
    (container,) = manifest("clusterservingruntime.yaml")["spec"]["containers"]
    args = [arg.replace("{{.Name}}", name) for arg in container["args"]]
    args = [str(folder) if arg == "/mnt/models" else arg for arg in args]
    args[args.index("--port") + 1] = str(http)
    args[args.index("--grpc-port") + 1] = str(grpc)
    args[args.index("--host") + 1] = "127.0.0.1"  # loopback only, in a test
    return [sys.executable, "-m", "gpuserve", *args]


def storage_layouts(demo_model: Path, root: Path) -> dict[str, Path]:
    """/mnt/models as the storage initializer leaves it, three ways."""
    program, spec = demo_model.read_bytes(), demo_model.with_suffix(".json").read_text()
    one = root / "one-file"
    one.mkdir()
    (one / "digits.pt2").write_bytes(program)
    (one / "digits.json").write_text(spec)
    triton = root / "triton" / "classifier"
    for version in ("1", "3"):
        (triton / version).mkdir(parents=True)
        (triton / version / "model.pt2").write_bytes(program)
        (triton / version / "model.json").write_text(spec)
    (triton / "config.pbtxt").write_text('platform: "pytorch_libtorch"\n')
    return {"one-file": one, "triton": root / "triton"}


KSERVE_CLIENTS = """
import asyncio, json, sys
import numpy as np
from kserve import (InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest,
                    RESTConfig)

async def main(http, grpc, name, rows):
    batch = np.array(rows, dtype=np.float32)
    out = {}
    for protocol in ("v1", "v2"):
        client = InferenceRESTClient(RESTConfig(protocol=protocol))
        out[protocol + "_ready"] = await client.is_model_ready(http, name)
        if protocol == "v1":
            out["v1"] = (await client.infer(http, {"instances": rows}, name))["predictions"]
        else:
            tensor = InferInput("pixels", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            answer = await client.infer(http, InferRequest(name, [tensor]), name)
            out["v2"] = answer.outputs[0].as_numpy().tolist()
        await client.close()
    client = InferenceGRPCClient(grpc, timeout=30)
    tensor = InferInput("pixels", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=True)
    answer = await client.infer(InferRequest(name, [tensor]))
    out["grpc"] = answer.outputs[0].as_numpy().tolist()
    await client.close()
    print("RESULT " + json.dumps(out))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])))
"""


@pytest.mark.integration
@pytest.mark.parametrize("layout", ["one-file", "triton"])
def test_the_runtimes_command_serves_the_storage_folder_to_kserves_clients(
    demo_model: Path, tmp_path: Path, layout: str
) -> None:
    folder = storage_layouts(demo_model, tmp_path)[layout]
    http, grpc = free_port(), free_port()
    command = runtime_command(folder, "digits-isvc", http, grpc)
    rows = [[float(i % 16) for i in range(64)], [0.0] * 64]
    with ServerProcess(command=command, env={}) as server:
        url = f"http://127.0.0.1:{http}"
        wait_ready(url)
        metadata = httpx.get(f"{url}/v2/models/digits-isvc").json()
        clients = [sys.executable, "-c", KSERVE_CLIENTS, url, f"127.0.0.1:{grpc}"]
        done = subprocess.run(
            [*clients, "digits-isvc", json.dumps(rows)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr[-3000:] + "\n".join(server.log[-20:])
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    assert out["v1_ready"] and out["v2_ready"]
    # A Triton repository serves its highest version, under the name KServe gave.
    assert metadata["name"] == "digits-isvc"
    assert metadata["versions"] == (["3"] if layout == "triton" else ["1"])
    # The three protocols give the same logits for the same rows; v1 answers the label.
    assert len(out["v2"]) == 2 and len(out["v2"][0]) == 10
    for got, want in zip(out["grpc"], out["v2"], strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    assert [p["label"] for p in out["v1"]] == [
        str(max(range(10), key=row.__getitem__)) for row in out["v2"]
    ]
