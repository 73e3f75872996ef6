"""An open-loop HTTP client for `open_loop.py`: POSTs one JSON body at Poisson arrival times.

    python scripts/_open_loop_client.py PORT BODY_FILE RATE SECONDS

Each request leaves at its scheduled time on a free kept-alive connection (a new one is opened
when none is free, up to 512), and its latency counts from that scheduled time. Prints one
JSON object: sent, answered, p50_ms, p99_ms. Bounded: arrivals stop after SECONDS, and what
is still unanswered 10 s later is counted as not answered.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

from _loadgen import percentile_ms

_MAX_CONNECTIONS = 512


async def _exchange(
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes
) -> int:
    reader, writer = connection
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def run(port: int, body: bytes, rate: float, seconds: float) -> dict[str, float]:
    request = (
        b"POST /predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened = 0
    latencies: list[float] = []
    rng = random.Random(17)

    async def one(scheduled: float) -> None:
        nonlocal opened
        if idle:
            connection = idle.pop()
        elif opened < _MAX_CONNECTIONS:
            opened += 1
            connection = await asyncio.open_connection("127.0.0.1", port)
        else:
            return  # past the pool: counted as sent, not answered
        try:
            status = await _exchange(connection, request)
        except (OSError, asyncio.IncompleteReadError):
            connection[1].close()
            opened -= 1
            return
        if status == 200:
            latencies.append(time.perf_counter() - scheduled)
        idle.append(connection)

    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    scheduled = start
    sent = 0
    while scheduled - start < seconds:
        scheduled += rng.expovariate(rate)
        # Behind schedule, it still yields a turn, so answers are read between arrivals.
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        task = asyncio.create_task(one(scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    for task in tasks:
        task.cancel()
    for _, writer in idle:
        writer.close()
    latencies.sort()
    return {
        "sent": sent,
        "answered": len(latencies),
        "p50_ms": percentile_ms(latencies, 0.5),
        "p99_ms": percentile_ms(latencies, 0.99),
    }


def main() -> None:
    port, body_file, rate, seconds = sys.argv[1:5]
    with open(body_file, "rb") as f:
        body = f.read()
    result = asyncio.run(run(int(port), body, float(rate), float(seconds)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
