"""A normal client's latency while an abusive one posts large invalid bodies, against a real server.

Starts `gpuserve serve` (the demo model) pinned to core 0, then measures a normal client (wrk,
pinned to core 1, one-instance `/predict` requests) twice: alone, and while another client
posts 4 MB bodies that the server must refuse, about `--rate` per second, rotating through
several kinds (too many instances, a bad last instance, strings, objects, v2 data that does
not fit its shape). Prints both rows and what the abusive requests got back.

    python scripts/abuse.py --duration 10 --rate 2
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from _loadgen import free_port, run_wrk, start, stop
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parent.parent
BODY_BYTES = 4_000_000


def abusive_bodies() -> list[tuple[str, str, bytes]]:
    """(kind, path, body): each just under 4 MB and each refused with a 4xx."""
    row = [round(float(x), 3) for x in load_digits().data[0]]
    many = BODY_BYTES // (len(json.dumps(row)) + 2)
    strings = BODY_BYTES // (len(json.dumps(["abc"] * 64)) + 2)
    return [
        ("too many instances", "/predict", _json({"instances": [row] * many})),
        ("a bad last instance", "/predict", _json({"instances": [row] * 1023 + [row[:10]]})),
        ("strings", "/predict", _json({"instances": [["abc"] * 64] * strings})),
        ("objects", "/predict", _json({"instances": [{"a": [1, 2, 3]}] * (BODY_BYTES // 20)})),
        (
            "v2 data past its shape",
            "/v2/models/digits/infer",
            _json(
                {
                    "inputs": [
                        {
                            "name": "pixels",
                            "shape": [many, 64],
                            "datatype": "FP32",
                            "data": [row] * many,
                        }
                    ]
                }
            ),
        ),
    ]


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


def abuse(
    port: int, rate: float, stop_at: float, answers: Counter[str], lock: threading.Lock
) -> None:
    """Post the bodies in turn, `rate` a second, until `stop_at`; count what comes back."""
    bodies = abusive_bodies()
    sent = 0
    while time.monotonic() < stop_at:
        kind, path, body = bodies[sent % len(bodies)]
        began = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("POST", path, body, {"content-type": "application/json"})
            status = connection.getresponse().status
            outcome = f"{kind}: {status}"
        except (OSError, http.client.HTTPException) as exc:
            outcome = f"{kind}: {type(exc).__name__}"
        finally:
            connection.close()
        with lock:
            answers[outcome] += 1
        sent += 1
        time.sleep(max(0.0, 1 / rate - (time.monotonic() - began)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rate", type=float, default=2.0, help="abusive bodies per second")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install wrk")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gpuserve", "serve", str(ROOT / "models" / "digits.pt2")]
    command += ["--port", str(port), "--device", "cpu"]
    command += ["--grpc-port", "0"]  # gRPC is not measured here: any free port
    env = {"GPUSERVE_LOG_LEVEL": "warning", "GPUSERVE_ACCESS_LOG": "false"}
    server = start(command, f"{url}/health/ready", env, ROOT)
    body = json.dumps({"inputs": load_digits().data[0].tolist()})
    answers: Counter[str] = Counter()
    try:
        alone = run_wrk(f"{url}/predict", body, args.concurrency, args.duration)
        stop_at = time.monotonic() + args.duration + 2
        abuser = threading.Thread(
            target=abuse, args=(port, args.rate, stop_at, answers, threading.Lock()), daemon=True
        )
        abuser.start()
        time.sleep(0.5)
        abused = run_wrk(f"{url}/predict", body, args.concurrency, args.duration)
        abuser.join(timeout=60)
    finally:
        stop(server)
    print(f"normal client: wrk c={args.concurrency}, {args.duration:g} s per row")
    print("| | req/s | p50 ms | p99 ms | errors |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, row in (("alone", alone), (f"beside {args.rate:g} bad 4 MB bodies/s", abused)):
        print(
            f"| {name} | {row['req_per_s']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} "
            f"| {row['errors'] + row['non_2xx']} |"
        )
    print("abusive requests:", dict(sorted(answers.items())))


if __name__ == "__main__":
    main()
