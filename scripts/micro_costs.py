"""What each of issue 17's small cuts saves, measured alone (µs per request).

    python scripts/micro_costs.py [--requests 100000] [--rounds 3]

- **One write per response.** Over a TCP loopback connection with Nagle off (as uvicorn sets
  it), a thread writes a typical /predict response (a 130-byte head, a 180-byte body) either
  in two sends (uvicorn's way: the head when the app starts its response, the body when it
  sends it) or in one (gpuserve's `CoalescedWrites`), while another thread drains the other
  end. On loopback the kernel delivers to the receiving socket within the sender's call, so
  the sending thread's CPU time is what the server pays.
- **One timer for all deadlines.** On uvloop, a request's wait inside `asyncio.timeout` (a
  timer armed and cancelled per request) against the same wait with its deadline in
  gpuserve's `Deadlines` (a dict entry; one timer for all), each over a bare await.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuserve.deadlines import Deadlines

HEAD = (
    b"HTTP/1.1 200 OK\r\nserver: uvicorn\r\ndate: Thu, 26 Nov 2026 15:00:00 GMT\r\n"
    b"content-type: application/json\r\ncontent-length: 180\r\n\r\n"
)
BODY = b"x" * 180


def per_response_us(split: bool, responses: int) -> float:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for end in (client, server):
        end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def drain() -> None:
        while client.recv(1 << 16):
            pass

    reader = threading.Thread(target=drain)
    reader.start()
    began = time.thread_time()
    for _ in range(responses):
        if split:
            server.send(HEAD)
            server.send(BODY)
        else:
            server.send(HEAD + BODY)
    spent = time.thread_time() - began
    server.close()
    reader.join()
    client.close()
    return spent / responses * 1e6


def deadline_us(requests: int) -> tuple[float, float]:
    """µs per request over a bare await: under `asyncio.timeout`, and with `Deadlines`."""

    async def measure() -> tuple[float, float]:
        async def answer() -> None:
            pass

        deadlines = Deadlines()
        began = time.perf_counter()
        for _ in range(requests):
            await answer()
        bare = time.perf_counter() - began
        began = time.perf_counter()
        for _ in range(requests):
            async with asyncio.timeout(30.0):
                await answer()
        per_request = time.perf_counter() - began
        began = time.perf_counter()
        for _ in range(requests):
            key = deadlines.add(30.0, lambda: None)
            await answer()
            deadlines.discard(key)
        shared = time.perf_counter() - began
        return (per_request - bare) / requests * 1e6, (shared - bare) / requests * 1e6

    return uvloop.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.rounds):
        two = per_response_us(True, args.requests)
        one = per_response_us(False, args.requests)
        timer, shared = deadline_us(args.requests)
        print(
            f"response: two writes {two:.2f}, one write {one:.2f}; deadline: a timer each "
            f"{timer:.2f}, one shared {shared:.2f} (µs per request)"
        )


if __name__ == "__main__":
    main()
