"""Soak test: mixed good and bad requests at high concurrency against a real server, for a set time.

Reports requests sent and answered, codes by kind of request, and the server's RSS at ready, after
the warm-up minute, and at the end. Good requests must all get 200, bad ones a 4xx, and none may
be lost. Bounded by --duration; the server is stopped by its own PID and must exit 0.

    python scripts/soak.py --duration 600 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parent.parent

# (kind, body, content type): the bad ones cover the ways clients get it wrong.
BAD: list[tuple[str, bytes, str]] = [
    ("bad-shape", b'{"inputs": [1, 2, 3]}', "application/json"),
    ("bad-json", b'{"inputs": [1, 2', "application/json"),
    ("bad-type", b'{"inputs": "seven"}', "application/json"),
    ("bad-range", json.dumps({"inputs": [99] * 64}).encode(), "application/json"),
    ("bad-nan", b'{"inputs": [NaN]}', "application/json"),
    ("bad-extra", b'{"inputs": [1], "x": 1}', "application/json"),
    ("bad-media", b"inputs=1", "application/x-www-form-urlencoded"),
    ("bad-empty", b"", "application/json"),
    ("bad-deep", b'{"inputs": ' + b"[" * 3000 + b"]" * 3000 + b"}", "application/json"),
]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_server(port: int, model: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "GPUSERVE_MODEL__PATH": str(model), "GPUSERVE_LOG_LEVEL": "warning"}
    command = [sys.executable, "-m", "gpuserve", "serve", "--port", str(port), "--device", "cpu"]
    command += ["--grpc-port", "0"]  # gRPC is not measured here: any free port
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("server did not become ready")


async def soak(
    url: str, pid: int, duration: float, concurrency: int, bad_share: float
) -> dict[str, Any]:
    digits = load_digits()
    good = [
        (json.dumps({"inputs": row.tolist()}).encode(), str(label))
        for row, label in zip(digits.data[:256], digits.target[:256], strict=True)
    ]
    codes: collections.Counter[str] = collections.Counter()
    sent = answered = wrong_labels = 0
    rng = random.Random(0)
    stop_at = time.monotonic() + duration
    warm_at = time.monotonic() + min(60.0, duration / 5)
    rss = {"ready": rss_mib(pid), "after_warmup": 0.0, "end": 0.0}
    limits = httpx.Limits(max_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def worker() -> None:
            nonlocal sent, answered, wrong_labels
            while time.monotonic() < stop_at:
                if rng.random() < bad_share:
                    kind, body, media = rng.choice(BAD)
                    label = None
                else:
                    kind, media = "good", "application/json"
                    body, label = rng.choice(good)
                sent += 1
                try:
                    response = await client.post(
                        "/predict", content=body, headers={"content-type": media}
                    )
                except httpx.HTTPError as exc:
                    codes[f"{kind} {type(exc).__name__}"] += 1
                    continue
                answered += 1
                codes[f"{'good' if kind == 'good' else 'bad'} {response.status_code}"] += 1
                if label is not None and response.status_code == 200:
                    wrong_labels += response.json()["outputs"]["label"] != label

        async def sample_rss() -> None:
            await asyncio.sleep(max(0.0, warm_at - time.monotonic()))
            rss["after_warmup"] = rss_mib(pid)

        await asyncio.gather(sample_rss(), *(worker() for _ in range(concurrency)))
    rss["end"] = rss_mib(pid)
    return {
        "duration_s": duration,
        "concurrency": concurrency,
        "sent": sent,
        "answered": answered,
        "lost": sent - answered,
        "codes": dict(sorted(codes.items())),
        "good_misclassified": wrong_labels,
        "rss_mib": {k: round(v, 1) for k, v in rss.items()},
        "rss_growth_after_warmup": round(rss["end"] / rss["after_warmup"] - 1, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "digits.pt2")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--bad-share", type=float, default=0.2)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    server = start_server(args.port, args.model)
    try:
        report = asyncio.run(
            soak(
                f"http://127.0.0.1:{args.port}",
                server.pid,
                args.duration,
                args.concurrency,
                args.bad_share,
            )
        )
    finally:
        server.send_signal(signal.SIGTERM)
        report_exit = server.wait(timeout=60)
    report["server_exit_code"] = report_exit
    print(json.dumps(report, indent=2))
    failed = (
        report["lost"]
        or report_exit != 0
        or any(key.startswith("good") and key != "good 200" for key in report["codes"])
        or any(
            key.startswith("bad") and not key.split()[1].startswith("4") for key in report["codes"]
        )
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
