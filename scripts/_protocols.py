"""`bench.py --protocols`: gpuserve serving the demo model, four ways in, at the default
settings and again with a longer `max_wait_ms` for HTTP binary and gRPC (`SETTINGS`).

/predict JSON, v2 HTTP JSON and v2 HTTP binary are driven by wrk; gRPC with raw contents by
`_grpc_load.py` (a Python client sending pre-serialized requests), against gpuserve and then
against bare grpcio servers answering a canned response (`_bare_grpc.py`: the floor that
grpcio itself sets; its threaded server, which gpuserve uses, and its asyncio one). Each load
generator runs
on core 1 and the server on core 0, and the protocols take turns within each repeat, so the
figures compare. Server CPU per request (the process's own CPU seconds over requests
answered) is the figure that does not depend on how fast the client is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from _loadgen import (
    batch_totals,
    free_port,
    load_result,
    mean_batch,
    median_rows,
    pinned,
    run_wrk,
    start,
    stop,
    tree_cpu_seconds,
)
from sklearn.datasets import load_digits
from tritonclient.grpc import service_pb2 as pb

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
GRPC_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def bodies() -> dict[str, Any]:
    """One digit image, as each protocol carries it."""
    image = load_digits().data[:1].astype(np.float32)
    tensor = {"name": "pixels", "shape": [1, 64], "datatype": "FP32"}
    header = json.dumps(
        {
            "inputs": [{**tensor, "parameters": {"binary_data_size": image.nbytes}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    grpc_request = pb.ModelInferRequest(
        model_name="digits",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="FP32", shape=[1, 64])
        ],
        raw_input_contents=[image.tobytes()],
    )
    return {
        "predict JSON": json.dumps({"inputs": image[0].tolist()}),
        "v2 HTTP JSON": json.dumps({"inputs": [{**tensor, "data": image.ravel().tolist()}]}),
        "v2 HTTP binary": (header + image.tobytes(), len(header)),
        "gRPC raw": grpc_request.SerializeToString(),
    }


def run_grpc(target: str, payload: bytes, concurrency: int, seconds: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("wb", suffix=".pb") as request:
        request.write(payload)
        request.flush()
        command = [sys.executable, str(SCRIPTS / "_grpc_load.py"), target, GRPC_METHOD]
        command += [request.name, str(concurrency), str(seconds)]
        out = subprocess.run(
            pinned(command, 1), capture_output=True, text=True, timeout=seconds + 60
        ).stdout
    return load_result(out)


# gpuserve's settings measured, by the label added to their rows' names: the defaults, and
# a longer `max_wait_ms` (gRPC's callers come back one by one, which the default 2 ms cuts
# short; see docs/protocols.md), with HTTP binary beside gRPC for the ratio.
SETTINGS: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "": ({}, ("predict JSON", "v2 HTTP JSON", "v2 HTTP binary", "gRPC raw")),
    ", max_wait_ms 5": ({"GPUSERVE_MODEL__MAX_WAIT_MS": "5"}, ("v2 HTTP binary", "gRPC raw")),
}


def measure_protocols(
    model: Path, concurrency: int, seconds: float, repeats: int
) -> list[dict[str, Any]]:
    """Every protocol under each of `SETTINGS`, `repeats` times in turn; the median row of
    each; then the floors of bare grpcio servers."""
    payloads = bodies()
    runs: dict[str, list[dict[str, Any]]] = {}
    for label, (extra, names) in SETTINGS.items():
        measured = measure_setting(model, extra, names, payloads, concurrency, seconds, repeats)
        for name, rows in measured.items():
            for row in rows:
                row["protocol"] = name + label
            runs[name + label] = rows
    for name, flags in FLOORS.items():
        runs[name] = grpc_floor(name, flags, payloads["gRPC raw"], concurrency, seconds, repeats)
    return median_rows(list(runs.values()))


def measure_setting(
    model: Path,
    extra: dict[str, str],
    names: tuple[str, ...],
    payloads: dict[str, Any],
    concurrency: int,
    seconds: float,
    repeats: int,
) -> dict[str, list[dict[str, Any]]]:
    """One server with the environment `extra`: the protocols `names`, in turn, each run."""
    server, url, grpc_port = serve_demo(model, extra)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    try:

        def load(name: str, clients: int, duration: float) -> dict[str, Any]:
            return drive(name, payloads, url, grpc_port, clients, duration)

        for name in names:
            load(name, 8, 2)  # warm-up, not recorded
        for _ in range(repeats):
            for name in names:
                cpu_before, batched_before = tree_cpu_seconds(server.pid), batch_totals(url)
                result = load(name, concurrency, seconds)
                cpu = tree_cpu_seconds(server.pid) - cpu_before
                answered = max(1, result["requests"] - result["non_2xx"])
                result.update(
                    protocol=name,
                    cpu_us_per_request=cpu / answered * 1e6,
                    mean_batch=mean_batch(batched_before, batch_totals(url)),
                )
                runs[name].append(result)
                print(json.dumps(result), flush=True)
    finally:
        stop(server)
    return runs


def serve_demo(model: Path, extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, int]:
    """`gpuserve serve` on core 0 with the environment `extra`, once ready: the process, its
    HTTP URL and its gRPC port."""
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gpuserve", "serve", str(model), "--device", "cpu"]
    command += ["--port", str(port), "--grpc-port", str(grpc_port)]
    env = {"GPUSERVE_LOG_LEVEL": "warning", "GPUSERVE_MODEL__MAX_QUEUE_SIZE": "100000", **extra}
    return start(command, f"{url}/health/ready", env, ROOT), url, grpc_port


def drive(
    name: str,
    payloads: dict[str, Any],
    url: str,
    grpc_port: int,
    clients: int,
    seconds: float,
) -> dict[str, Any]:
    """The load of the protocol `name` (a key of `bodies()`) against a server of `serve_demo`."""
    payload = payloads[name]
    if name == "gRPC raw":
        return run_grpc(f"127.0.0.1:{grpc_port}", payload, clients, seconds)
    if name == "predict JSON":
        return run_wrk(f"{url}/predict", payload, clients, seconds)
    target = f"{url}/v2/models/digits/infer"
    if name == "v2 HTTP JSON":
        return run_wrk(target, payload, clients, seconds)
    body, length = payload
    headers = {"Inference-Header-Content-Length": str(length)}
    return run_wrk(target, body, clients, seconds, headers)


FLOORS = {
    "gRPC floor: bare threaded grpcio server, canned answer": [],
    "bare grpc.aio server, canned answer": ["--asyncio"],
}


def grpc_floor(
    name: str, flags: list[str], payload: bytes, concurrency: int, seconds: float, repeats: int
) -> list[dict[str, Any]]:
    """The same gRPC load against `_bare_grpc.py` on the same core: grpcio's own cost."""
    port = free_port()
    command = [sys.executable, str(SCRIPTS / "_bare_grpc.py"), str(port), *flags]
    server = subprocess.Popen(pinned(command, 0), cwd=ROOT, start_new_session=True)
    target = f"127.0.0.1:{port}"
    runs = []
    try:
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        run_grpc(target, payload, 8, 2)  # warm-up, not recorded
        for _ in range(repeats):
            cpu_before = tree_cpu_seconds(server.pid)
            result = run_grpc(target, payload, concurrency, seconds)
            answered = max(1, result["requests"] - result["non_2xx"])
            cpu = tree_cpu_seconds(server.pid) - cpu_before
            result.update(protocol=name, cpu_us_per_request=cpu / answered * 1e6, mean_batch=None)
            runs.append(result)
            print(json.dumps(result), flush=True)
    finally:
        stop(server)
    return runs


def protocols_report(rows: list[dict[str, Any]], concurrency: int) -> str:
    lines = [
        f"Demo model, c={concurrency}, server on core 0, client on core 1 (median of repeats)",
        "",
        "| protocol | req/s | p50 ms | p99 ms | server CPU µs/request | mean batch "
        "| req/s per repeat | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        batch = f"{row['mean_batch']:.1f}" if row.get("mean_batch") is not None else "n/a"
        lines.append(
            f"| {row['protocol']} | {row['req_per_s']:.0f} | {row['p50_ms']:.2f} | "
            f"{row['p99_ms']:.2f} | {row['cpu_us_per_request']:.0f} | {batch} | "
            f"{row['req_per_s_runs']} | {row['errors'] + row['non_2xx']} |"
        )
    return "\n".join(lines)
