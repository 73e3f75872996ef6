"""gRPC under a hostile or bursty client, on real sockets: a burst past the queue gets
RESOURCE_EXHAUSTED from gpuserve (counted), never CANCELLED by gRPC's core; connections are
capped, and silent or idle ones closed."""

from __future__ import annotations

import asyncio
import collections
import re
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import httpx
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from .helpers import ONE, ServerProcess, wait_ready
from .test_workers import descendants


def infer_request() -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="FP32", shape=[1, 64])
    pixels = np.ones((1, 64), np.float32).tobytes()
    return pb.ModelInferRequest(model_name="digits", inputs=[tensor], raw_input_contents=[pixels])


async def burst(address: str, calls: int, channels: int = 8) -> collections.Counter[str]:
    """`calls` ModelInfer calls at once over `channels` connections; their status codes."""
    opened = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in opened]
    request = infer_request()
    codes: collections.Counter[str] = collections.Counter()

    async def one(i: int) -> None:
        try:
            await stubs[i % channels].ModelInfer(request, timeout=60)
            codes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            codes[exc.code().name] += 1

    try:
        await asyncio.gather(*(one(i) for i in range(calls)))
    finally:
        for channel in opened:
            await channel.close()
    return codes


def grpc_port(server: ServerProcess) -> tuple[str, int]:
    address = urlsplit(f"//{server.grpc_url}")
    return address.hostname or "127.0.0.1", address.port or 0


def test_a_burst_past_the_queue_gets_resource_exhausted_never_cancelled(
    demo_model: Path,
) -> None:
    env = {"GPUSERVE_MODEL__MAX_QUEUE_SIZE": "32", "GPUSERVE_ACCESS_LOG": "false"}
    with ServerProcess("--device", "cpu", env=env) as server:
        wait_ready(server.url)
        host, port = grpc_port(server)
        codes = asyncio.run(burst(f"{host}:{port}", 3000))
        metrics = httpx.get(f"{server.url}/metrics").text
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["OK"] > 0 and sum(codes.values()) == 3000
    series = r'gpuserve_requests_total\{code="RESOURCE_EXHAUSTED",model="digits",protocol="grpc"'
    counted = re.search(series + r"[^}]*\} (\S+)", metrics)
    assert float(counted.group(1) if counted else 0) == codes["RESOURCE_EXHAUSTED"]


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (what it sends first is read)."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


def test_grpc_connections_are_capped_and_silent_ones_closed(demo_model: Path) -> None:
    """Past max_connections a gRPC connection is closed at once, HTTP's cap is its own, and
    one that never says a word is closed at header_timeout_s."""
    env = {"GPUSERVE_MAX_CONNECTIONS": "4", "GPUSERVE_HEADER_TIMEOUT_S": "30"}
    with ServerProcess("--device", "cpu", env=env) as server:
        wait_ready(server.url)
        host, port = grpc_port(server)
        held = [socket.create_connection((host, port)) for _ in range(4)]
        try:
            time.sleep(0.3)
            with socket.create_connection((host, port)) as refused:
                assert closed_within(refused, 5)
            assert not any(closed_within(sock, 0.3) for sock in held)
            # HTTP's connections are counted apart.
            assert httpx.post(f"{server.url}/predict", content=ONE).status_code == 200
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.3)
        codes = asyncio.run(burst(f"{host}:{port}", 4, channels=1))
        assert codes == {"OK": 4}
    env = {"GPUSERVE_HEADER_TIMEOUT_S": "1", "GPUSERVE_KEEP_ALIVE_S": "1"}
    with ServerProcess("--device", "cpu", env=env) as server:
        wait_ready(server.url)
        host, port = grpc_port(server)
        with socket.create_connection((host, port)) as silent:
            started = time.monotonic()
            assert closed_within(silent, 15)
            assert time.monotonic() - started >= 0.5
        codes = asyncio.run(idle_then_call(f"{host}:{port}"))
        assert codes == ["OK", "IDLE", "OK"]


async def idle_then_call(address: str) -> list[str]:
    """A call, then silence past keep_alive_s: the server closes the connection (the channel
    goes idle), and the next call reconnects."""
    seen = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(infer_request(), timeout=30)
        seen.append("OK")
        for _ in range(100):
            await asyncio.sleep(0.1)
            if channel.get_state() == grpc.ChannelConnectivity.IDLE:
                seen.append("IDLE")
                break
        await stub.ModelInfer(infer_request(), timeout=30)
        seen.append("OK")
    return seen


def test_a_large_message_is_decoded_in_a_parse_process_with_the_same_answer(
    demo_model: Path,
) -> None:
    """As a large HTTP body is: the event loop never parses it; the answer is the same."""
    env = {"GPUSERVE_PARSE_OFFLOAD_BYTES": "2048"}
    rows = np.random.default_rng(0).uniform(0, 16, (16, 64)).astype(np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="FP32", shape=[16, 64])
    tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    large = pb.ModelInferRequest(model_name="digits", inputs=[tensor])
    bad = pb.ModelInferRequest()
    bad.CopyFrom(large)
    bad.inputs[0].shape[:] = [16, 65]
    assert large.ByteSize() > 2048

    async def calls(address: str) -> tuple[list[bytes], bytes, str]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            alone = []
            for row in rows:  # small: decoded inline
                one = pb.ModelInferRequest.InferInputTensor(
                    name="pixels", datatype="FP32", shape=[1, 64]
                )
                small = pb.ModelInferRequest(
                    model_name="digits", inputs=[one], raw_input_contents=[row.tobytes()]
                )
                alone.append((await stub.ModelInfer(small, timeout=30)).raw_output_contents[0])
            together = (await stub.ModelInfer(large, timeout=30)).raw_output_contents[0]
            try:
                await stub.ModelInfer(bad, timeout=30)
                refused = "OK"
            except grpc.aio.AioRpcError as exc:
                refused = f"{exc.code().name}: {exc.details()}"
            return alone, together, refused

    with ServerProcess("--device", "cpu", env=env) as server:
        wait_ready(server.url)
        assert server.process is not None
        before = descendants(server.process.pid)
        host, port = grpc_port(server)
        alone, together, refused = asyncio.run(calls(f"{host}:{port}"))
        started = descendants(server.process.pid) - before
    expected = np.concatenate([np.frombuffer(out, np.float32) for out in alone])
    np.testing.assert_allclose(np.frombuffer(together, np.float32), expected, atol=1e-4)
    assert refused.startswith("INVALID_ARGUMENT") and "request id" in refused
    assert started, "no parse process was started for the large message"
