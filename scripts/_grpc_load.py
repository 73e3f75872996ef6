"""A gRPC load generator for unary calls, wrk's counterpart for gRPC (no wrk speaks it).

    python scripts/_grpc_load.py HOST:PORT METHOD REQUEST_FILE CONCURRENCY SECONDS

Sends the serialized request in REQUEST_FILE as is (no protobuf work per call on the client),
keeping CONCURRENCY calls in flight on one channel (HTTP/2 streams, as gRPC clients do), for
SECONDS. Prints one line like run_wrk's: RESULT {"requests", "duration_s", "errors",
"non_2xx" (calls that ended with a status other than OK), "p50_ms", "p99_ms"}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
from _loadgen import percentile_ms


async def drive(
    target: str, method: str, payload: bytes, concurrency: int, seconds: float
) -> dict[str, float]:
    latencies: list[float] = []
    failed = 0
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method)  # no serializers: bytes in, bytes out
        await call(payload, timeout=30)  # the connection, up before the clock starts
        started = time.perf_counter()
        stop_at = started + seconds

        async def worker() -> None:
            nonlocal failed
            while (sent := time.perf_counter()) < stop_at:
                try:
                    await call(payload, timeout=10)
                except grpc.aio.AioRpcError:
                    failed += 1
                    continue
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies) + failed,
        "duration_s": duration,
        "errors": 0,
        "non_2xx": failed,
        "p50_ms": percentile_ms(latencies, 0.50),
        "p99_ms": percentile_ms(latencies, 0.99),
    }


def main() -> None:
    target, method, request_file, concurrency, seconds = sys.argv[1:6]
    payload = Path(request_file).read_bytes()
    result = asyncio.run(drive(target, method, payload, int(concurrency), float(seconds)))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
