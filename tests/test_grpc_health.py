"""gRPC's standard health service, on a real socket, checked byte for byte: what
Kubernetes' gRPC probes and grpc-health-probe send and read."""

from __future__ import annotations

import asyncio

import anyio
import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton

from gpuserve.config import Settings

from .helpers import FAKE, KEY, FakeModel, both, fake_loader

pytestmark = pytest.mark.anyio

SERVING, NOT_SERVING, SERVICE_UNKNOWN = b"\x08\x01", b"\x08\x02", b"\x08\x03"


def request(service: str) -> bytes:
    """HealthCheckRequest{service}, encoded by hand: field 1, length-delimited."""
    name = service.encode()
    return (b"\x0a" + bytes([len(name)]) + name) if name else b""


async def test_check_answers_for_the_server_and_each_model(fake_model: FakeModel) -> None:
    settings = Settings(device="cpu", model=FAKE, api_keys=[KEY])
    async with both(settings, loader=fake_loader(fake_model)) as servers:
        async with grpc.aio.insecure_channel(servers.url) as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            # No API key: probes carry none, as for /health/ready.
            assert await check(request("")) == SERVING
            assert await check(request("inference.GRPCInferenceService")) == SERVING
            assert await check(request("fake")) == SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await check(request("nope"))
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            # Draining: not serving from the first moment, as /health/ready says 503.
            app_models = servers.http._transport.app.state.models  # type: ignore[attr-defined]
            app_models.begin_shutdown()
            assert await check(request("")) == NOT_SERVING
            assert await check(request("fake")) == NOT_SERVING
        keyed = {"authorization": f"Bearer {KEY}"}
        metrics = (await servers.http.get("/metrics", headers=keyed)).text
        route = 'route="/grpc.health.v1.Health/Check"'
        assert f'code="OK",model="",protocol="grpc",{route},version=""}} 5.0' in metrics


async def test_watch_sends_the_status_then_each_change(fake_model: FakeModel) -> None:
    settings = Settings(device="cpu", model=FAKE)
    async with (
        both(settings, loader=fake_loader(fake_model)) as servers,
        grpc.aio.insecure_channel(servers.url) as channel,
    ):
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
        stream = watch(request(""))
        with anyio.fail_after(10):
            assert await stream.read() == SERVING
            app_models = servers.http._transport.app.state.models  # type: ignore[attr-defined]
            app_models.begin_shutdown()
            assert await stream.read() == NOT_SERVING
            # Then the stream ends: an open Watch must not hold the server's exit.
            assert await stream.read() is grpc.aio.EOF
        stream.cancel()
        unknown = watch(request("nope"))
        with anyio.fail_after(10):
            assert await unknown.read() == SERVICE_UNKNOWN
        unknown.cancel()
        await asyncio.sleep(0)


async def test_an_unloaded_model_is_not_serving_not_an_error(
    fake_model: FakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(device="cpu", model=FAKE)
    async with (
        both(settings, loader=fake_loader(fake_model)) as servers,
        grpc.aio.insecure_channel(servers.url) as channel,
    ):
        app_models = servers.http._transport.app.state.models  # type: ignore[attr-defined]
        await app_models.unload("fake", 1.0)
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        assert await check(request("fake")) == NOT_SERVING
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
        stream = watch(request("fake"))
        with anyio.fail_after(10):
            assert await stream.read() == NOT_SERVING
        stream.cancel()
        await asyncio.sleep(0)
    assert not [r for r in caplog.records if r.exc_info is not None]


async def test_calls_past_the_threads_wait_for_one_beside_an_open_watch(
    fake_model: FakeModel,
) -> None:
    """Two threads: an open Watch holds one, and twelve calls at once take turns on the
    other, each answered with its own rows."""
    settings = Settings(device="cpu", model=FAKE, grpc_threads=2)
    async with (
        both(settings, loader=fake_loader(fake_model)) as servers,
        grpc.aio.insecure_channel(servers.url) as channel,
    ):
        stream = channel.unary_stream("/grpc.health.v1.Health/Watch")(request(""))
        with anyio.fail_after(10):
            assert await stream.read() == SERVING

        async def infer(value: float) -> float:
            x = triton.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(np.full((1, 4), value, dtype=np.float32))
            return float((await servers.grpc.infer("fake", [x])).as_numpy("y")[0])

        with anyio.fail_after(30):
            answers = await asyncio.gather(*(infer(i) for i in range(12)))
        assert answers == [4.0 * i for i in range(12)]
        stream.cancel()
