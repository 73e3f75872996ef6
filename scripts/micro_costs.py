"""What each of the request path's small cuts saves, measured alone (µs per request).

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
- **The HTTP protocol's Python.** gpuserve's protocol (uvicorn's, `connections.py`) driven
  in-process, without a socket: a /predict request fed to `data_received`, answered by an
  ASGI app that reads it and sends a fixed 64-byte JSON answer. What a leaner HTTP front could
  save at most, since the socket's own calls stay whatever the front.
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

from typing import Any

import uvicorn
from uvicorn.server import ServerState

from gpuserve.core.deadlines import Deadlines
from gpuserve.http.connections import guarded_protocol

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


class _Transport(asyncio.Transport):
    """A connection's transport that goes nowhere: the protocol's own cost alone."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def write(self, data: Any) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


_ANSWER = b'{"model":"light","outputs":[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0]}'[:64]
_REQUEST = (
    b"POST /predict HTTP/1.1\r\nhost: 127.0.0.1:8000\r\ncontent-type: application/json\r\n"
    b"content-length: 40\r\n\r\n" + b'{"inputs":[1,2,3,4,5,6,7,8,9,10,11,12]} '
)


async def _answer(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"64")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": _ANSWER})


def protocol_us(requests: int) -> float:
    """CPU µs per request through gpuserve's HTTP protocol, in-process, with a trivial app."""

    async def measure() -> float:
        config = uvicorn.Config(_answer, log_level="warning", lifespan="off", access_log=False)
        config.load()
        protocol = guarded_protocol(10.0, 100)(
            config=config, server_state=ServerState(), app_state={}
        )
        protocol.connection_made(_Transport())
        began = time.process_time()
        for _ in range(requests):
            protocol.data_received(_REQUEST)
            await asyncio.sleep(0)  # the request's task runs the app
            await asyncio.sleep(0)  # and its answer completes
        return (time.process_time() - began) / requests * 1e6

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
        protocol = protocol_us(args.requests // 5)
        print(
            f"response: two writes {two:.2f}, one write {one:.2f}; deadline: a timer each "
            f"{timer:.2f}, one shared {shared:.2f}; HTTP protocol in-process {protocol:.1f} "
            "(µs per request)"
        )


if __name__ == "__main__":
    main()
