"""RequestContext, the pure ASGI middleware around every request: the last line of defence."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gpuserve.core.envelope import Envelope
from gpuserve.core.metrics import Metrics
from gpuserve.http.context import RequestContext

pytestmark = pytest.mark.anyio


def scope() -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/predict", "headers": [], "state": {}}


async def call(app: Any) -> tuple[list[dict[str, Any]], BaseException | None]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    try:
        envelope = Envelope(Metrics(), [], access_log=True, protocol="http")
        await RequestContext(app, envelope)(scope(), receive, send)
    except BaseException as exc:
        return sent, exc
    return sent, None


def answer(sent: list[dict[str, Any]]) -> tuple[int, dict[str, str], dict[str, Any]]:
    start, body = sent[0], sent[1]
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(body["body"])


class Poison(BaseException):
    pass


async def test_a_base_exception_escaping_the_app_is_a_json_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise Poison("from a user's hook")

    sent, escaped = await call(app)
    assert escaped is None  # answered here; nothing reaches uvicorn's text/plain 500
    status, headers, body = answer(sent)
    assert status == 500 and headers["content-type"] == "application/json"
    assert body["error"] == "internal error" and body["request_id"] == headers["x-request-id"]
    assert "Poison: from a user's hook" in caplog.text


async def test_a_request_cancelled_by_the_servers_stop_gets_a_json_503() -> None:
    entered = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        entered.set()
        await asyncio.Event().wait()  # a request the graceful stop gives up on

    task = asyncio.ensure_future(call(app))
    await entered.wait()
    task.cancel()
    sent, escaped = await task
    assert isinstance(escaped, asyncio.CancelledError)  # the cancellation goes on
    status, headers, body = answer(sent)
    assert status == 503 and headers["retry-after"] == "1"
    assert "stopping" in body["error"]


async def test_an_error_after_the_response_started_is_not_answered_twice() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("mid-body")

    sent, escaped = await call(app)
    assert isinstance(escaped, RuntimeError)
    assert [m["type"] for m in sent] == ["http.response.start"]


async def test_the_docs_routes_are_counted_under_their_own_paths_and_unknown_ones_are_not() -> None:
    from gpuserve.config import ModelSettings, Settings
    from gpuserve.http import create_app

    from .helpers import DEMO, FAKE_SPEC, FakeModel, fake_loader
    from .test_app import serving

    settings = Settings(device="cpu", model=ModelSettings(path=DEMO, freeze_gc=False))
    async with serving(create_app(settings, loader=fake_loader(FakeModel(FAKE_SPEC)))) as client:
        for path in ("/docs", "/openapi.json", "/no/such/route", "/another/unknown"):
            await client.get(path)
        for path in ("/docs/assets/swagger-ui.css", "/docs/assets/a.js", "/docs/assets/b.js"):
            await client.get(path)
        text = (await client.get("/metrics")).text
    # The docs' files, real or made up, under the one label of where they are mounted.
    assert (
        'gpuserve_requests_total{code="200",model="",'
        'protocol="http",route="/docs/assets",version=""} 1.0' in text
    )
    assert (
        'gpuserve_requests_total{code="404",model="",'
        'protocol="http",route="/docs/assets",version=""} 2.0' in text
    )
    assert "a.js" not in text
    assert (
        'gpuserve_requests_total{code="200",model="",protocol="http",route="/docs",version=""} 1.0'
        in text
    )
    assert (
        'gpuserve_requests_total{code="200",model="",'
        'protocol="http",route="/openapi.json",version=""} 1.0' in text
    )
    assert (
        'gpuserve_requests_total{code="404",model="",'
        'protocol="http",route="unmatched",version=""} 2.0' in text
    )
