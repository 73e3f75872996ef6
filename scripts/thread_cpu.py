"""Where a request's server CPU goes, thread by thread, over v2 binary HTTP and gRPC.

    python scripts/thread_cpu.py [--seconds 6] [--concurrency 32] [--max-wait-ms 2]

The setting of `bench.py --protocols`: the demo model, `gpuserve serve` pinned to core 0,
the load (wrk, or the gRPC client of `_grpc_load.py`) on core 1. For each protocol, each of
the server's threads' CPU over the run (/proc/PID/task) divided by the requests answered;
py-spy names the threads (Python's names are not the kernel's), so it needs py-spy and root
or ptrace rights. Threads of one kind (grpcio's call threads, its event engine's) are summed.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

from _loadgen import free_port, run_wrk, start, stop
from _protocols import ROOT, bodies, run_grpc

TICK = os.sysconf("SC_CLK_TCK")


def thread_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """Every thread of `pid`: its kernel name and CPU seconds so far."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue  # it ended
        fields = text.rsplit(")", 1)[1].split()
        name = text[text.index("(") + 1 : text.rindex(")")]
        threads[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return threads


def python_names(pid: int) -> dict[int, str]:
    """The Python name of each of `pid`'s Python threads, as py-spy reads them."""
    beside = Path(sys.executable).parent / "py-spy"  # a virtual environment's, unactivated
    dump = subprocess.run(
        [str(beside) if beside.exists() else "py-spy", "dump", "--pid", str(pid)],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return {int(tid): name for tid, name in re.findall(r'Thread (\d+) \([^)]*\): "([^"]+)"', dump)}


def kind(name: str) -> str:
    """Threads of one kind share a row: "grpc-call_7" counts as "grpc-call_*"."""
    return re.sub(r"[_-]?\d+$", "_*", name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    args = parser.parse_args()
    model = ROOT / "models" / "digits.pt2"
    if not model.exists():
        subprocess.run(
            [sys.executable, "scripts/make_demo_model.py", "--out", "models"], cwd=ROOT, check=True
        )
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gpuserve", "serve", str(model), "--device", "cpu"]
    command += ["--port", str(port), "--grpc-port", str(grpc_port)]
    env = {
        "GPUSERVE_LOG_LEVEL": "warning",
        "GPUSERVE_MODEL__MAX_QUEUE_SIZE": "100000",
        "GPUSERVE_MODEL__MAX_WAIT_MS": str(args.max_wait_ms),
    }
    server = start(command, f"{url}/health/ready", env, ROOT)
    payloads = bodies()
    body, length = payloads["v2 HTTP binary"]
    headers = {"Inference-Header-Content-Length": str(length)}
    target = f"{url}/v2/models/digits/infer"

    def load(protocol: str, clients: int, seconds: float) -> dict[str, float]:
        if protocol == "gRPC raw":
            return run_grpc(f"127.0.0.1:{grpc_port}", payloads[protocol], clients, seconds)
        return run_wrk(target, body, clients, seconds, headers)

    try:
        for protocol in ("v2 HTTP binary", "gRPC raw"):
            load(protocol, 8, 2)  # warm-up; it also starts grpcio's threads
            before = thread_seconds(server.pid)
            result = load(protocol, args.concurrency, args.seconds)
            after = thread_seconds(server.pid)
            names = python_names(server.pid)
            answered = max(1, int(result["requests"] - result["non_2xx"]))
            rows: collections.Counter[str] = collections.Counter()
            for tid, (name, seconds) in after.items():
                spent = seconds - before.get(tid, (name, 0.0))[1]
                rows[kind(names.get(tid, name))] += spent / answered * 1e6
            print(
                f"\n{protocol}, c={args.concurrency}, max_wait_ms {args.max_wait_ms}: "
                f"{result['req_per_s']:.0f} req/s, {sum(rows.values()):.0f} µs/request\n"
            )
            print("| thread | server CPU µs/request |\n| --- | ---: |")
            for name, us in rows.most_common():
                if us >= 0.5:
                    print(f"| {name} | {us:.0f} |")
    finally:
        stop(server)


if __name__ == "__main__":
    main()
