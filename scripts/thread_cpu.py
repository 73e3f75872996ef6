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
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from _loadgen import _cpu_seconds, stop
from _protocols import bodies, drive, serve_demo
from _workers import demo_model


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
        threads[int(task.name)] = (name, _cpu_seconds(fields))
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
    extra = {"GPUSERVE_MODEL__MAX_WAIT_MS": str(args.max_wait_ms)}
    server, url, grpc_port = serve_demo(demo_model(), extra)
    payloads = bodies()

    def load(protocol: str, clients: int, seconds: float) -> dict[str, Any]:
        return drive(protocol, payloads, url, grpc_port, clients, seconds)

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
