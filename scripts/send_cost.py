"""What a response's second write costs the server: one send of head and body against two.

    python scripts/send_cost.py [--responses 100000] [--rounds 3]

Over a TCP loopback connection with Nagle off (as uvicorn sets it), the sending thread writes
a typical /predict response (a 130-byte head, a 180-byte body) `--responses` times, either in
two sends (uvicorn's way: the head when the app starts its response, the body when it sends
it) or in one (gpuserve's `CoalescedWrites`), while another thread drains the other end. On
loopback the kernel delivers to the receiving socket within the sender's call, so the
sending thread's CPU time is what the server pays. Prints µs per response for each way.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for _ in range(args.rounds):
        two = per_response_us(True, args.responses)
        one = per_response_us(False, args.responses)
        print(f"two writes {two:.2f} µs, one write {one:.2f} µs per response")


if __name__ == "__main__":
    main()
