"""A normal client's latency while an abusive one attacks the same server.

Starts `gpuserve serve` (the demo model) pinned to core 0, then measures a normal client (wrk,
pinned to core 1, one-instance `/predict` requests) twice: alone, and beside an attack, about
`--rate` a second:

- `bodies`: 4 MB bodies that must be refused (too many instances, a bad last instance,
  strings, objects, v2 data that does not fit its shape);
- `heads`: 4 MB request lines and 18 MB of tiny headers (414 and 431);
- `trickle`: new connections that send their headers, then a body a byte a second (408 at
  `body_timeout_s`, set to 5 s here);
- `grpc`: 1.5 MB gRPC messages that must be refused (contents that do not fit the shape, and
  bytes that are no message at all), beside 200 silent connections to the gRPC port.

Prints both rows and what the abusive requests got back.

    python scripts/abuse.py --duration 10 --rate 2 --attack bodies
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import shutil
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from _loadgen import free_port, run_wrk, start, stop
from sklearn.datasets import load_digits
from tritonclient.grpc import service_pb2 as pb

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


class Attack:
    """One abusive client: `rate` attempts a second until `stop_at`, outcomes counted."""

    def __init__(self, port: int, grpc_port: int, rate: float, stop_at: float) -> None:
        self.port, self.grpc_port, self.rate, self.stop_at = port, grpc_port, rate, stop_at
        self.answers: Counter[str] = Counter()

    def paced(self, attempt: Callable[[int], str]) -> None:
        sent = 0
        while time.monotonic() < self.stop_at:
            began = time.monotonic()
            self.answers[attempt(sent)] += 1
            sent += 1
            time.sleep(max(0.0, 1 / self.rate - (time.monotonic() - began)))

    def bodies(self) -> None:
        bodies = abusive_bodies()

        def attempt(sent: int) -> str:
            kind, path, body = bodies[sent % len(bodies)]
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                connection.request("POST", path, body, {"content-type": "application/json"})
                return f"{kind}: {connection.getresponse().status}"
            except (OSError, http.client.HTTPException) as exc:
                return f"{kind}: {type(exc).__name__}"
            finally:
                connection.close()

        self.paced(attempt)

    def heads(self) -> None:
        heads = [
            ("4 MB URL", b"GET /" + b"a" * 4_000_000 + b" HTTP/1.1\r\n"),
            (
                "18 MB of headers",
                b"POST /predict HTTP/1.1\r\nhost: x\r\n" + b"x: 1\r\n" * 3_000_000,
            ),
        ]

        def attempt(sent: int) -> str:
            kind, data = heads[sent % len(heads)]
            return f"{kind}: {raw_status(self.port, data)}"

        self.paced(attempt)

    def trickle(self) -> None:
        head = (
            b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 1000\r\n\r\n"
        )
        open_: list[socket.socket] = []
        began = time.monotonic()
        while time.monotonic() < self.stop_at:
            while len(open_) + sum(self.answers.values()) < self.rate * (time.monotonic() - began):
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                sock.sendall(head)
                sock.setblocking(False)
                open_.append(sock)
            for sock in list(open_):
                try:
                    answer = sock.recv(65536)
                except BlockingIOError:
                    with contextlib.suppress(OSError):
                        sock.send(b"1")
                    continue
                except OSError:
                    answer = b""
                self.answers[f"trickled body: {status_of(answer)}"] += 1
                open_.remove(sock)
                sock.close()
            time.sleep(1.0)
        self.answers["trickled body: still open at the end"] += len(open_)
        for sock in open_:
            sock.close()

    def grpc(self) -> None:
        silent = [socket.create_connection(("127.0.0.1", self.grpc_port)) for _ in range(200)]
        tensor = pb.ModelInferRequest.InferInputTensor(
            name="pixels", datatype="FP32", shape=[1, 64]
        )
        misfit = pb.ModelInferRequest(
            model_name="digits", inputs=[tensor], raw_input_contents=[bytes(1_500_000)]
        ).SerializeToString()
        garbage = np.random.default_rng(0).bytes(1_500_000)
        messages = [("contents past the shape", misfit), ("no message at all", garbage)]
        channel = grpc.insecure_channel(
            f"127.0.0.1:{self.grpc_port}", options=[("grpc.max_send_message_length", -1)]
        )
        # Bytes in, bytes out: the garbage could not be built as a message.
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

        def attempt(sent: int) -> str:
            kind, message = messages[sent % len(messages)]
            try:
                infer(message, timeout=30)
                return f"{kind}: OK"
            except grpc.RpcError as exc:
                return f"{kind}: {exc.code().name}"

        try:
            self.paced(attempt)
        finally:
            channel.close()
            for sock in silent:
                sock.close()


def raw_status(port: int, data: bytes) -> str:
    """Send `data` in 64 kB pieces until the server answers; the status it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            for start_at in range(0, len(data), 65536):
                sock.sendall(data[start_at : start_at + 65536])
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    return status_of(answer)


def status_of(answer: bytes) -> str:
    return answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rate", type=float, default=2.0, help="attacks per second")
    parser.add_argument("--attack", choices=ATTACKS, default="bodies")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install wrk")
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gpuserve", "serve", str(ROOT / "models" / "digits.pt2")]
    command += ["--port", str(port), "--device", "cpu"]
    command += ["--grpc-port", str(grpc_port)]
    env = {
        "GPUSERVE_LOG_LEVEL": "warning",
        "GPUSERVE_ACCESS_LOG": "false",
        "GPUSERVE_BODY_TIMEOUT_S": "5",
    }
    server = start(command, f"{url}/health/ready", env, ROOT)
    body = json.dumps({"inputs": load_digits().data[0].tolist()})
    try:
        alone = run_wrk(f"{url}/predict", body, args.concurrency, args.duration)
        attack = Attack(port, grpc_port, args.rate, time.monotonic() + args.duration + 2)
        abuser = threading.Thread(target=getattr(attack, args.attack), daemon=True)
        abuser.start()
        time.sleep(0.5)
        abused = run_wrk(f"{url}/predict", body, args.concurrency, args.duration)
        abuser.join(timeout=60)
    finally:
        stop(server)
    print(f"normal client: wrk c={args.concurrency}, {args.duration:g} s per row")
    print("| | req/s | p50 ms | p99 ms | errors |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, row in (("alone", alone), (f"beside {args.rate:g}/s `{args.attack}`", abused)):
        print(
            f"| {name} | {row['req_per_s']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} "
            f"| {row['errors'] + row['non_2xx']} |"
        )
    print("abusive requests:", dict(sorted(attack.answers.items())))


ATTACKS = ["bodies", "heads", "trickle", "grpc"]


if __name__ == "__main__":
    main()
