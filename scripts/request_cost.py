"""Per-request CPU cost of the request path, outside the model: decode, check, build the batch
tensor, encode the answer. The "typical" path is what a tutorial server does (standard
library json, torch.tensor from Python lists); gpuserve's is what /predict and /v2 run.

    python scripts/request_cost.py [--values 256] [--rounds 20000]

Prints microseconds of CPU per request (process time, best of 5 runs) for each path.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import torch

from gpuserve.protocols import oip
from gpuserve.protocols.schemas import PredictRequest
from gpuserve.spec import ModelSpec, TensorSpec, to_array, to_arrays


def typical(body: bytes, output: torch.Tensor) -> bytes:
    values = json.loads(body)["inputs"]
    torch.tensor([values], dtype=torch.float32)
    return json.dumps({"outputs": output.tolist()}).encode()


def gpuserve_predict(spec: ModelSpec) -> Callable[[bytes, torch.Tensor], bytes]:
    def run(body: bytes, output: torch.Tensor) -> bytes:
        parsed = PredictRequest.model_validate_json(body)
        instance = to_array(parsed.inputs, spec.input, "inputs")
        torch.from_numpy(np.stack([instance]))
        return orjson.dumps({"model": spec.name, "outputs": output.tolist()})

    return run


def gpuserve_instances(spec: ModelSpec) -> Callable[[bytes, torch.Tensor], bytes]:
    def run(body: bytes, output: torch.Tensor) -> bytes:
        parsed = PredictRequest.model_validate_json(body)
        assert parsed.instances is not None
        torch.from_numpy(np.stack(to_arrays(parsed.instances, spec.input, "instances")))
        return orjson.dumps({"model": spec.name, "outputs": output.tolist()})

    return run


def gpuserve_v2(
    spec: ModelSpec, header_length: str | None
) -> Callable[[bytes, torch.Tensor], bytes]:
    def run(body: bytes, output: torch.Tensor) -> bytes:
        request = oip.decode_request(body, spec, header_length=header_length)
        torch.from_numpy(np.stack(request.instances))
        rows = output.tolist()
        return oip.encode_response(spec, rows, None, request.outputs, "1")[0]

    return run


def cpu_us(
    fn: Callable[[bytes, torch.Tensor], Any], body: bytes, output: torch.Tensor, rounds: int
) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(rounds):
            fn(body, output)
        best = min(best, time.process_time() - started)
    return best / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--values", type=int, default=256, help="floats per instance")
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = ModelSpec(
        name="bench",
        input=TensorSpec(name="x", shape=(args.values,)),
        output=TensorSpec(name="y", shape=(10,)),
    )
    rng = np.random.default_rng(0)
    instance = rng.standard_normal(args.values).astype(np.float32)
    one_out = torch.randn(10)
    body = json.dumps({"inputs": instance.tolist()}).encode()
    block = rng.standard_normal((64, args.values)).astype(np.float32)
    block_body = json.dumps({"instances": block.tolist()}).encode()
    block_out = torch.randn(64, 10)
    v2_json = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, args.values], "datatype": "FP32", "data": instance}
            ]
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    raw = instance.tobytes()
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, args.values],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    )

    rows = [
        (
            "typical: json + torch.tensor(list), 1 instance",
            typical,
            body,
            one_out[None],
            args.rounds,
        ),
        ("gpuserve /predict, 1 instance", gpuserve_predict(spec), body, one_out, args.rounds),
        (
            "gpuserve /v2 JSON, 1 instance",
            gpuserve_v2(spec, None),
            v2_json,
            one_out[None],
            args.rounds,
        ),
        (
            "gpuserve /v2 binary, 1 instance",
            gpuserve_v2(spec, str(len(head))),
            head + raw,
            one_out[None],
            args.rounds,
        ),
        (
            "gpuserve /predict, 64 instances (per instance)",
            gpuserve_instances(spec),
            block_body,
            block_out,
            args.rounds // 64,
        ),
    ]
    results = {}
    print(f"{'path':<50} {'CPU us/request':>15}")
    for name, fn, payload, output, rounds in rows:
        us = cpu_us(fn, payload, output, max(rounds, 50))
        if "64 instances" in name:
            us /= 64
        results[name] = us
        print(f"{name:<50} {us:>15.1f}")
    base = results[rows[0][0]]
    print(f"\ngpuserve /predict is {base / results[rows[1][0]]:.1f}x cheaper than the typical path")


if __name__ == "__main__":
    main()
