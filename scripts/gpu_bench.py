"""On a GPU: the encoder's raw forward limit against gpuserve's served throughput, at bf16.

Samples GPU utilisation and memory through NVML while the server is under load, and prints a
JSON report to paste into docs/benchmarks.md with the GPU's name. With `--device cpu` it runs
the same steps on the CPU (no NVML samples), which is how it is checked on machines without one.

    python scripts/gpu_bench.py                    # cuda, bf16
    python scripts/gpu_bench.py --device cpu --seconds 3 --precision fp32
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from _loadgen import free_port, run_wrk, start, stop
from bench import MODELS, export_models

ROOT = Path(__file__).resolve().parent.parent
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def raw_limit(path: Path, device: str, precision: str, seconds: float) -> dict[int, float]:
    module = torch.export.load(str(path)).module().to(device)
    rates = {}
    with torch.inference_mode():
        for size in (1, 8, 32, 64, 128, 256):
            x = MODELS["encoder"]["example"](size).to(device)
            with torch.autocast(
                device_type=torch.device(device).type,
                dtype=AUTOCAST.get(precision, torch.float32),
                enabled=precision in AUTOCAST,
            ):
                module(x)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                calls, started = 0, time.perf_counter()
                while time.perf_counter() - started < seconds:
                    module(x)
                    calls += 1
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
            rates[size] = calls * size / (time.perf_counter() - started)
    return rates


class NvmlSampler(threading.Thread):
    """Utilisation and memory of one GPU every 100 ms; empty where NVML is missing."""

    def __init__(self, index: int) -> None:
        super().__init__(daemon=True)
        self.index = index
        self.samples: list[tuple[int, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception:
            return
        while not self.stopped.wait(0.1):
            utilisation = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            used = pynvml.nvmlDeviceGetMemoryInfo(handle).used
            self.samples.append((int(utilisation), int(used)))
        pynvml.nvmlShutdown()

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"nvml": "unavailable"}
        utilisation = sorted(u for u, _ in self.samples)
        return {
            "gpu_util_median_pct": utilisation[len(utilisation) // 2],
            "gpu_util_max_pct": utilisation[-1],
            "gpu_mem_used_max_mib": max(m for _, m in self.samples) / 2**20,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-batch-size", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "gpu")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu for a dry run")

    path = export_models(args.out / "models")["encoder"]
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "precision": args.precision,
        "torch": torch.__version__,
        "raw_samples_per_s": raw_limit(path, args.device, args.precision, args.seconds / 4),
        "served": [],
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "GPUSERVE_MODEL__PATH": str(path),
        "GPUSERVE_MODEL__PRECISION": args.precision,
        "GPUSERVE_MODEL__MAX_BATCH_SIZE": str(args.max_batch_size),
        "GPUSERVE_MODEL__MAX_QUEUE_SIZE": "100000",
        "GPUSERVE_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", "gpuserve", "serve", "--port", str(port)]
    command += ["--device", args.device]
    server = start(command, f"{url}/health/ready", env, ROOT)
    body = json.dumps({"inputs": MODELS["encoder"]["body"]()})
    try:
        for concurrency in args.concurrency:
            sampler = NvmlSampler(0)
            sampler.start()
            result = run_wrk(f"{url}/predict", body, concurrency, args.seconds)
            sampler.stopped.set()
            sampler.join()
            report["served"].append({"concurrency": concurrency, **result, **sampler.summary()})
    finally:
        stop(server)
    best_raw = max(report["raw_samples_per_s"].values())
    best_served = max(row["req_per_s"] for row in report["served"])
    report["served_over_raw_best"] = round(best_served / best_raw, 3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
