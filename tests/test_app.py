"""The HTTP API in-process (httpx over ASGI, lifespan running), with a fake model."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import torch

from gpuserve.config import ModelSettings, Settings, available_cores
from gpuserve.core.errors import InferenceError, ModelLoadError
from gpuserve.core.progress import open_counted
from gpuserve.handler import Handler
from gpuserve.http import create_app
from gpuserve.model.device import DeviceInfo, passes_share_cores
from gpuserve.model.runner import Runner
from gpuserve.spec import ModelSpec, TensorSpec

from .helpers import (
    CPU,
    DEMO,
    FAKE_SPEC,
    SETTINGS,
    FakeModel,
    fake_loader,
    predict_scope,
    serving,
    wait_for_status,
)

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}


@pytest.fixture
async def client(fake_model: FakeModel) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(create_app(SETTINGS, loader=fake_loader(fake_model))) as client:
        yield client


async def test_predict_one_instance(client: httpx.AsyncClient) -> None:
    response = await client.post("/predict", json={"inputs": [1, 2, 3, 4]})
    assert response.status_code == 200
    assert response.json() == {"model": "fake", "outputs": 10.0}
    assert response.headers["content-type"] == "application/json"


async def test_predict_several_instances_in_order(client: httpx.AsyncClient) -> None:
    instances = [[i, 0, 0, 0] for i in range(6)]
    response = await client.post("/predict", json={"instances": instances})
    assert response.status_code == 200
    assert response.json()["outputs"] == [float(i) for i in range(6)]


async def test_concurrent_requests_are_batched_and_routed(
    client: httpx.AsyncClient, fake_model: FakeModel
) -> None:
    responses = await asyncio.gather(
        *(client.post("/predict", json={"inputs": [i, i, 0, 0]}) for i in range(40))
    )
    assert [r.json()["outputs"] for r in responses] == [2.0 * i for i in range(40)]
    assert sum(fake_model.batches) >= 40


BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("wrong shape", b'{"inputs": [1, 2, 3]}', "inputs: expected float32[4], got shape [3]"),
    ("wrong type", b'{"inputs": ["a", "b", "c", "d"]}', "inputs: expected float32[4], got strings"),
    ("nan", b'{"inputs": [NaN, 1, 2, 3]}', "inputs: expected float32[4], got NaN or infinity"),
    ("infinity", b'{"inputs": [1e999, 1, 2, 3]}', "NaN or infinity"),
    ("out of range", b'{"inputs": [1, 2, 3, 1000]}', "values must be <= 100"),
    ("empty body", b"", "the request body is empty"),
    ("not json", b"{inputs: [1,2,3,4]", "Invalid JSON"),
    ("json but not an object", b"[1, 2, 3, 4]", "body"),
    ("neither field", b"{}", "exactly one of 'inputs'"),
    ("both fields", b'{"inputs": [1,2,3,4], "instances": [[1,2,3,4]]}', "exactly one"),
    ("extra field", b'{"inputs": [1,2,3,4], "extra": 1}', "extra: Extra inputs are not permitted"),
    ("empty instances", b'{"instances": []}', "'instances' must be a non-empty list"),
    ("null inputs", b'{"inputs": null}', "inputs: expected float32[4], got null"),
    ("null beside instances", b'{"inputs": null, "instances": [[1,2,3,4]]}', "exactly one"),
    ("bad instance", b'{"instances": [[1,2,3,4], [1,2]]}', "instances[1]: expected float32[4]"),
    ("too many instances", b'{"instances": [' + b",".join([b"[1,2,3,4]"] * 9) + b"]}", "at most 8"),
    ("deep nesting", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", "recursion limit"),
    ("unicode garbage", '{"inputs": ["\udcff\u202e"]}'.encode("utf-8", "surrogatepass"), ""),
]


@pytest.mark.parametrize(("case", "body", "message"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_bad_input_is_a_422_that_names_the_problem(
    client: httpx.AsyncClient, fake_model: FakeModel, case: str, body: bytes, message: str
) -> None:
    response = await client.post(
        "/predict", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    error = response.json()
    assert message in error["error"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert fake_model.batches == [], "a bad request reached the model"
    good = await client.post("/predict", json={"inputs": [1, 1, 1, 1]})
    assert good.status_code == 200 and good.json()["outputs"] == 4.0


async def test_bad_requests_do_not_disturb_good_ones_batched_beside_them(
    client: httpx.AsyncClient,
) -> None:
    bodies = [{"inputs": [i, 0, 0, 0]} if i % 2 else {"inputs": [i]} for i in range(30)]
    responses = await asyncio.gather(*(client.post("/predict", json=b) for b in bodies))
    for i, response in enumerate(responses):
        if i % 2:
            assert response.status_code == 200 and response.json()["outputs"] == float(i)
        else:
            assert response.status_code == 422


async def test_readiness_waits_for_a_slow_load_and_shows_its_progress(
    fake_model: FakeModel, tmp_path: Path
) -> None:
    release, halfway = threading.Event(), threading.Event()
    weights = tmp_path / "weights.bin"
    weights.write_bytes(bytes(3 * 2**20))

    def slow_loader(settings: ModelSettings, device: DeviceInfo) -> FakeModel:
        with open_counted(weights) as file:  # what the file loaders read through
            file.read(2**20)
            halfway.set()
            assert release.wait(timeout=30)
            file.read()
        return fake_model

    app = create_app(SETTINGS, loader=slow_loader)
    async with serving(app, wait_ready=False) as client:
        assert (await client.get("/health/live")).status_code == 200
        assert await anyio.to_thread.run_sync(halfway.wait, 30)
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        body = ready.json()
        assert body["status"] == "loading"
        model = body["models"]["digits"]
        assert model["status"] == "loading"
        progress = model["progress"]
        assert progress["phase"] == "reading weights.bin"
        assert progress["bytes_total"] == 3 * 2**20
        assert 2**20 <= progress["bytes_read"] < 3 * 2**20  # buffered reads run ahead a little
        assert progress["seconds"] >= 0
        predict = await client.post("/predict", json={"inputs": [1, 2, 3, 4]})
        assert predict.status_code == 503
        assert predict.headers["retry-after"] == "2"
        assert "still loading" in predict.json()["error"]
        release.set()
        await wait_for_status(client, "ready")
        assert (await client.post("/predict", json={"inputs": [1, 2, 3, 4]})).status_code == 200


async def test_a_failed_load_keeps_readiness_503_with_the_reason() -> None:
    def broken_loader(settings: ModelSettings, device: DeviceInfo) -> FakeModel:
        raise ModelLoadError("model file not found: nowhere.pt2")

    async with serving(create_app(SETTINGS, loader=broken_loader), wait_ready=False) as client:
        body = await wait_for_status(client, "failed")
        assert "nowhere.pt2" in body["reason"]
        assert (await client.get("/health/ready")).status_code == 503
        assert (await client.get("/health/live")).status_code == 200
        predict = await client.post("/predict", json={"inputs": [1, 2, 3, 4]})
        assert predict.status_code == 503 and "nowhere.pt2" in predict.json()["error"]


async def test_a_failing_forward_is_a_generic_500_with_a_request_id(
    client: httpx.AsyncClient, fake_model: FakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    fake_model.error = RuntimeError("secret internal detail")
    response = await client.post(
        "/predict", json={"inputs": [1, 2, 3, 4]}, headers={"x-request-id": "req-42"}
    )
    assert response.status_code == 500
    assert response.json() == {"error": "inference failed", "request_id": "req-42"}
    assert "secret internal detail" in caplog.text  # the log has it; the client does not
    assert (await client.get("/health/ready")).status_code == 200


async def test_a_collector_crash_flips_readiness_and_fails_fast(client: httpx.AsyncClient) -> None:
    service = client._transport.app.state.models.default  # type: ignore[attr-defined]

    def broken_dispatch() -> None:
        raise RuntimeError("simulated collector bug")

    service.batcher._dispatch = broken_dispatch
    stranded = await client.post("/predict", json={"inputs": [1, 2, 3, 4]})
    assert stranded.status_code == 503 and "simulated" in stranded.json()["error"]
    ready = await client.get("/health/ready")
    assert ready.status_code == 503 and "simulated" in ready.json()["reason"]
    assert (await client.post("/predict", json={"inputs": [1, 2, 3, 4]})).status_code == 503


async def test_request_ids_are_echoed_or_generated(client: httpx.AsyncClient) -> None:
    echoed = await client.get("/health/live", headers={"x-request-id": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    generated = await client.get("/health/live", headers={"x-request-id": "bad id\n<script>"})
    assert "script" not in generated.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{24,}", generated.headers["x-request-id"])
    again = await client.get("/health/live")
    assert again.headers["x-request-id"] != generated.headers["x-request-id"]


async def test_unknown_routes_get_the_error_shape(client: httpx.AsyncClient) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404
    assert response.json()["request_id"] == response.headers["x-request-id"]
    assert (await client.get("/predict")).status_code == 405


async def test_info_describes_model_device_batching_and_versions(client: httpx.AsyncClient) -> None:
    info = (await client.get("/info")).json()
    assert info["model"]["name"] == "fake"
    assert info["model"]["input"]["shape"] == [4]
    assert info["device"]["device"] == "cpu"
    assert info["batching"]["max_instances_per_request"] == 8
    # The rule the batcher got: the fake model is on the CPU, so it depends on the cores.
    on_cpu_alone = passes_share_cores([CPU], 1, available_cores())
    assert info["batching"]["early_handover"] is not on_cpu_alone
    assert info["versions"]["gpuserve"] == "0.1.0"


async def test_metrics_count_requests_batches_and_queue(client: httpx.AsyncClient) -> None:
    await client.post("/predict", json={"inputs": [1, 2, 3, 4]})
    await client.post("/predict", json={"inputs": [1]})
    text = (await client.get("/metrics")).text
    assert (
        'gpuserve_requests_total{code="200",model="digits",'
        'protocol="http",route="/predict",version="1"} 1.0' in text
    )
    assert (
        'gpuserve_requests_total{code="422",model="digits",'
        'protocol="http",route="/predict",version="1"} 1.0' in text
    )
    bucket = 'le="+Inf",model="digits",protocol="http",route="/predict",version="1"'
    assert f"gpuserve_request_seconds_bucket{{{bucket}}} 2.0" in text
    # The 422 never reached the batcher.
    assert 'gpuserve_batch_size_count{model="digits",version="1"} 1.0' in text
    assert 'gpuserve_queue_depth{model="digits",version="1"} 0.0' in text
    assert 'gpuserve_forward_seconds_count{model="digits",version="1"}' in text
    assert 'gpuserve_ready{model="digits",version="1"} 1.0' in text


async def test_openapi_documents_predict(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]
    assert "oneOf" in body["content"]["application/json"]["schema"]


async def test_the_docs_pages_load_every_file_from_this_server(client: httpx.AsyncClient) -> None:
    """/docs and /redoc work offline: Swagger UI's and ReDoc's files come from an installed
    package, not from a CDN."""
    for page in ("/docs", "/redoc"):
        html = (await client.get(page)).text
        urls = re.findall(r'(?:src|href)="([^"]+)"', html)
        urls += re.findall(r"url: '([^']+)'", html)
        assert urls and not [url for url in urls if "://" in url or url.startswith("//")], urls
        for url in urls:
            response = await client.get(url)
            assert response.status_code == 200, url
            assert len(response.content) > 1000, url


async def test_a_body_not_declared_as_json_is_a_415(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/predict",
        content=b"inputs=1",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 415
    assert "application/json" in response.json()["error"]


async def test_an_oversized_body_is_refused_before_parsing(fake_model: FakeModel) -> None:
    settings = SETTINGS.model_copy(update={"max_body_bytes": 1024})
    async with serving(create_app(settings, loader=fake_loader(fake_model))) as client:
        big = b'{"inputs": [' + b"1," * 1000 + b"1]}"
        declared = await client.post("/predict", content=big, headers=JSON)
        assert declared.status_code == 413 and "limit is 1024" in declared.json()["error"]

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(100):
                yield b"[1,2,3,4]," * 10

        chunked = await client.post("/predict", content=chunks(), headers=JSON)
        assert chunked.status_code == 413
        assert fake_model.batches == []


async def test_a_body_sent_in_pieces_is_read_whole(client: httpx.AsyncClient) -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b'{"inputs": [1, 2', b"", b", 3, 4", b"]}"):
            yield piece

    response = await client.post("/predict", content=pieces(), headers=JSON)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"] == 10.0


async def test_a_client_gone_while_sending_its_body_is_a_499_and_no_error(
    fake_model: FakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(SETTINGS, loader=fake_loader(fake_model))
    messages = iter(
        [
            {"type": "http.request", "body": b'{"inputs": [1, ', "more_body": True},
            {"type": "http.disconnect"},
        ]
    )

    async def receive() -> dict[str, Any]:
        return next(messages)

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = predict_scope([(b"content-type", b"application/json")])
    async with serving(app):
        await app(scope, receive, send)
    assert sent[0]["status"] == 499
    assert b"disconnected" in sent[1]["body"]
    assert fake_model.batches == []
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_a_request_of_several_instances_past_its_deadline_gets_one_504(
    client: httpx.AsyncClient, fake_model: FakeModel
) -> None:
    fake_model.delay_s = 0.5
    # Every one of its futures fails at once; the answer is one 504, and the queue is clear.
    late = await client.post(
        "/predict",
        json={"instances": [[1, 2, 3, 4]] * 3},
        headers={"x-request-timeout-ms": "20"},
    )
    assert late.status_code == 504 and "deadline" in late.json()["error"]
    fake_model.delay_s = 0.0
    assert (await client.post("/predict", json={"inputs": [1, 2, 3, 4]})).status_code == 200


async def test_the_deadline_header_turns_a_slow_answer_into_a_504(
    client: httpx.AsyncClient, fake_model: FakeModel
) -> None:
    fake_model.delay_s = 0.5
    slow = await client.post(
        "/predict", json={"inputs": [1, 2, 3, 4]}, headers={"x-request-timeout-ms": "20"}
    )
    assert slow.status_code == 504 and "deadline" in slow.json()["error"]
    fake_model.delay_s = 0.0
    fine = await client.post(
        "/predict", json={"inputs": [1, 2, 3, 4]}, headers={"x-request-timeout-ms": "5000"}
    )
    assert fine.status_code == 200
    text = (await client.get("/metrics")).text
    assert 'gpuserve_timed_out_total{model="digits",version="1"} 1.0' in text


@pytest.mark.parametrize("value", ["0", "-5", "soon", "1_000", "+100", "1e3", "100.5", "0x10"])
async def test_a_bad_deadline_header_is_a_422(client: httpx.AsyncClient, value: str) -> None:
    response = await client.post(
        "/predict", json={"inputs": [1, 2, 3, 4]}, headers={"x-request-timeout-ms": value}
    )
    assert response.status_code == 422 and "X-Request-Timeout-Ms" in response.json()["error"]


async def test_a_full_queue_answers_503_with_retry_after(fake_model: FakeModel) -> None:
    settings = SETTINGS.model_copy(
        update={"model": SETTINGS.model.model_copy(update={"max_queue_size": 2})}
    )
    fake_model.delay_s = 0.2
    async with serving(create_app(settings, loader=fake_loader(fake_model))) as client:
        responses = await asyncio.gather(
            *(client.post("/predict", json={"inputs": [i, 0, 0, 0]}) for i in range(12))
        )
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 503} and codes.count(200) >= 2
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.headers["retry-after"] == "1" and "queue is full" in refused.json()["error"]
        for r in responses:
            if r.status_code == 200:
                assert r.json()["outputs"] == float(responses.index(r))
        assert "gpuserve_refused_total" in (await client.get("/metrics")).text


KEY = "k" * 24


@pytest.fixture
async def locked(fake_model: FakeModel) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(**{**SETTINGS.model_dump(), "api_keys": [KEY, "another-key-of-16+"]})
    async with serving(create_app(settings, loader=fake_loader(fake_model))) as client:
        yield client


async def test_api_keys_guard_everything_but_the_health_checks(locked: httpx.AsyncClient) -> None:
    assert (await locked.get("/health/ready")).status_code == 200
    assert (await locked.get("/health/live")).status_code == 200
    for method, path in [("POST", "/predict"), ("GET", "/info"), ("GET", "/metrics")]:
        response = await locked.request(method, path, json={"inputs": [1, 2, 3, 4]})
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["request_id"] == response.headers["x-request-id"]
    wrong = await locked.post(
        "/predict", json={"inputs": [1, 2, 3, 4]}, headers={"authorization": f"Bearer {KEY}x"}
    )
    assert wrong.status_code == 401
    right = await locked.post(
        "/predict", json={"inputs": [1, 2, 3, 4]}, headers={"authorization": f"Bearer {KEY}"}
    )
    assert right.status_code == 200
    second = await locked.get("/info", headers={"authorization": "bearer another-key-of-16+"})
    assert second.status_code == 200


async def test_no_route_lets_a_request_choose_a_path_module_or_device(
    client: httpx.AsyncClient,
) -> None:
    schema = (await client.get("/openapi.json")).json()
    for path in schema["paths"].values():
        for operation in path.values():
            # The one parameter anywhere is a model's name, looked up among the served models.
            names = {parameter["name"] for parameter in operation.get("parameters", [])}
            assert names <= {"name"}
    escape = await client.post("/models/..%2F..%2Fetc%2Fpasswd/predict", json={"inputs": [1]})
    assert escape.status_code == 404
    unknown = await client.post("/models/passwd/predict", json={"inputs": [1, 2, 3, 4]})
    assert unknown.status_code == 404 and "no model named 'passwd'" in unknown.json()["error"]
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    fields = {name for branch in body["schema"]["oneOf"] for name in branch["properties"]}
    assert fields == {"inputs", "instances"}


async def test_openapi_describes_the_loaded_models_input(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    one, many = body["schema"]["oneOf"]
    assert one["properties"]["inputs"]["minItems"] == 4
    assert one["properties"]["inputs"]["items"]["maximum"] == 100
    assert many["properties"]["instances"]["maxItems"] == 8


async def test_a_request_whose_deadline_passes_in_the_queue_never_runs(
    client: httpx.AsyncClient, fake_model: FakeModel
) -> None:
    fake_model.delay_s = 0.3
    busy = asyncio.create_task(client.post("/predict", json={"inputs": [1, 0, 0, 0]}))
    await asyncio.sleep(0.05)  # the first request is in the worker now
    late = await client.post(
        "/predict", json={"inputs": [2, 0, 0, 0]}, headers={"x-request-timeout-ms": "30"}
    )
    assert late.status_code == 504
    assert (await busy).status_code == 200
    assert fake_model.batches == [1]  # the expired request was dropped, never batched


async def test_a_stuck_forward_turns_readiness_503_until_it_returns(fake_model: FakeModel) -> None:
    model_settings = SETTINGS.model.model_copy(update={"forward_timeout_s": 0.05})
    settings = SETTINGS.model_copy(update={"model": model_settings})
    async with serving(create_app(settings, loader=fake_loader(fake_model))) as client:
        fake_model.delay_s = 0.5
        stuck = await client.post("/predict", json={"inputs": [1, 2, 3, 4]})
        assert stuck.status_code == 503 and "more than 0.05s" in stuck.json()["error"]
        ready = await client.get("/health/ready")
        assert ready.status_code == 503 and "more than 0.05s" in ready.json()["reason"]
        fake_model.delay_s = 0.0
        await wait_for_status(client, "ready")
        assert (await client.post("/predict", json={"inputs": [1, 2, 3, 4]})).status_code == 200


async def test_an_unexpected_error_still_gets_the_error_shape_and_a_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Unencodable(FakeModel):
        def postprocess(self, row: Any) -> Any:
            return {row}  # a set: JSON cannot carry it, a bug in a user's hook

    app = create_app(SETTINGS, loader=fake_loader(Unencodable(FAKE_SPEC)))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gpuserve") as client:
            await wait_for_status(client, "ready")
            response = await client.post("/predict", json={"inputs": [1, 2, 3, 4]})
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "internal error"
    assert body["request_id"] == response.headers["x-request-id"]
    assert f"request {body['request_id']} failed unexpectedly" in caplog.text


class _AnyId:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)


ANY_ID: Any = _AnyId()


class Poison(BaseException):
    """A user's BaseException subclass, which escapes every `except Exception`."""


class PoisonedModel(FakeModel):
    """Raises `raised` for a batch holding an instance whose first value is 13."""

    def __init__(self, raised: BaseException) -> None:
        super().__init__(FAKE_SPEC)
        self.raised = raised

    def __call__(self, instances: list[Any]) -> list[Any]:
        if any(float(x[0]) == 13 for x in instances):
            raise self.raised
        return super().__call__(instances)


@pytest.mark.parametrize(
    "raised",
    [StopIteration("x"), Poison("x"), KeyboardInterrupt(), SystemExit(1), GeneratorExit()],
    ids=lambda exc: type(exc).__name__,
)
async def test_whatever_a_model_raises_only_its_request_gets_a_json_500(
    raised: BaseException,
) -> None:
    model = PoisonedModel(raised)
    async with serving(create_app(SETTINGS, loader=fake_loader(model))) as client:
        service = client._transport.app.state.models.default  # type: ignore[attr-defined]
        with anyio.fail_after(20):
            responses = await asyncio.gather(
                *(client.post("/predict", json={"inputs": [i, 0, 0, 0]}) for i in range(10, 17))
            )
        by_value = dict(zip(range(10, 17), responses, strict=True))
        poisoned = by_value.pop(13)
        assert poisoned.status_code == 500
        assert poisoned.json() == {"error": "inference failed", "request_id": ANY_ID}
        assert {v: r.json()["outputs"] for v, r in by_value.items()} == {
            v: float(v) for v in by_value
        }
        assert service.state == "ready"


class HookModel(FakeModel):
    def __init__(self, raised: BaseException, hook: str) -> None:
        super().__init__(FAKE_SPEC)
        setattr(self, hook, self._hook)
        self.raised = raised

    def _hook(self, value: Any) -> Any:
        raise self.raised


@pytest.mark.parametrize("hook", ["preprocess", "postprocess"])
async def test_a_hook_raising_a_base_exception_is_a_json_500(hook: str) -> None:
    model = HookModel(Poison("in a hook"), hook)
    async with serving(create_app(SETTINGS, loader=fake_loader(model))) as client:
        response = await client.post("/predict", json={"inputs": [1, 2, 3, 4]})
        assert response.status_code == 500
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"] == f"{hook}ing failed"
        assert (await client.get("/health/ready")).status_code == 200


async def test_expired_requests_leave_the_queue_to_live_ones(fake_model: FakeModel) -> None:
    settings = SETTINGS.model_copy(
        update={
            "model": SETTINGS.model.model_copy(update={"max_queue_size": 4, "max_batch_size": 2})
        }
    )
    fake_model.delay_s = 1.0
    async with serving(create_app(settings, loader=fake_loader(fake_model))) as client:
        # One request holds the worker, two wait staged behind it, four fill the queue; all
        # but the first expire.
        busy = asyncio.ensure_future(client.post("/predict", json={"inputs": [1, 0, 0, 0]}))
        await asyncio.sleep(0.2)
        short = {"x-request-timeout-ms": "100"}

        def expiring(values: range) -> list[Any]:
            return [
                asyncio.ensure_future(
                    client.post("/predict", json={"inputs": [i, 0, 0, 0]}, headers=short)
                )
                for i in values
            ]

        staged = expiring(range(2))
        await asyncio.sleep(0.05)
        expired = await asyncio.gather(*staged, *expiring(range(2, 6)))
        assert [r.status_code for r in expired] == [504] * 6
        depth = (await client.get("/metrics")).text
        assert re.search(
            r'gpuserve_queue_depth\{model="digits",version="1"\} 0\.0$', depth, re.M
        ), depth
        fresh = await client.post("/predict", json={"inputs": [5, 0, 0, 0]})
        assert fresh.status_code == 200 and fresh.json()["outputs"] == 5.0
        assert (await busy).status_code == 200


@pytest.mark.integration  # a parse process
async def test_large_bodies_parsed_in_another_process_get_the_same_answers(
    fake_model: FakeModel,
) -> None:
    settings = SETTINGS.model_copy(update={"parse_offload_bytes": 64})
    async with serving(create_app(settings, loader=fake_loader(fake_model))) as client:
        good = {"instances": [[i, 1, 1, 1] for i in range(8)]}
        response = await client.post("/predict", json=good)
        assert response.status_code == 200
        assert response.json()["outputs"] == [float(i + 3) for i in range(8)]
        bad = {"instances": [[1, 1, 1, 1]] * 7 + [[1, 1]]}
        refused = await client.post("/predict", json=bad)
        assert refused.status_code == 422
        assert refused.json()["error"].startswith("instances[7]: expected float32[4]")
        too_many = await client.post("/predict", json={"instances": [[1, 1, 1, 1]] * 9})
        assert too_many.status_code == 422 and "at most 8" in too_many.json()["error"]
        decoder = client._transport.app.state.decoder  # type: ignore[attr-defined]
        assert decoder._pool is not None  # the bodies went to the parse process


@pytest.mark.parametrize("path", ["/health/live/", "/predict/", "/models/digits/"])
async def test_a_trailing_slash_is_never_redirected_to_the_clients_host(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path, headers={"host": "evil.example"})
    assert response.status_code == 404 and "location" not in response.headers
    assert set(response.json()) == {"error", "request_id"}


async def test_a_non_finite_output_is_a_500_for_its_request_alone() -> None:
    class Half(FakeModel):
        def __call__(self, instances: list[Any]) -> list[Any]:
            rows = super().__call__(instances)
            return [
                InferenceError("NaN") if float(x[0]) == 15 else row
                for x, row in zip(instances, rows, strict=True)
            ]

    async with serving(create_app(SETTINGS, loader=fake_loader(Half(FAKE_SPEC)))) as client:
        bad, good = await asyncio.gather(
            client.post("/predict", json={"inputs": [15, 0, 0, 0]}),
            client.post("/predict", json={"inputs": [1, 0, 0, 0]}),
        )
        assert bad.status_code == 500 and bad.json()["error"] == "NaN"
        assert good.status_code == 200 and good.json()["outputs"] == 1.0


async def test_openapi_lists_only_the_errors_each_route_can_give(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]

    def codes(path: str, method: str) -> set[str]:
        return set(paths[path][method]["responses"]) - {"200"}

    assert codes("/predict", "post") == {"401", "413", "415", "422", "500", "503", "504"}
    assert codes("/models/{name}/predict", "post") == codes("/predict", "post") | {"404"}
    assert codes("/v2/models/{name}", "get") == {"401", "404", "500", "503"}
    assert codes("/v2/models/{name}/ready", "get") == {"400", "401", "404", "500"}
    assert codes("/v2/health/ready", "get") == {"400"}
    assert "422" not in codes("/v2/models/{name}/infer", "post")  # v2 answers 400


JSON_TYPE = {"content-type": "application/json"}


async def test_gzip_and_deflate_bodies_are_read_within_the_limit(client: httpx.AsyncClient) -> None:
    import gzip
    import json
    import zlib

    body = json.dumps({"inputs": [1, 2, 3, 4]}).encode()
    plain = await client.post("/predict", content=body, headers=JSON_TYPE)
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        headers = {**JSON_TYPE, "content-encoding": encoding}
        answer = await client.post("/predict", content=packed, headers=headers)
        assert answer.status_code == 200 and answer.json() == plain.json(), encoding
    # 5 MB of zeros packs into a few kB: the limit holds on what the body becomes.
    bomb = gzip.compress(b" " * (5 * 2**20))
    assert len(bomb) < 64 * 1024
    refused = await client.post(
        "/predict", content=bomb, headers={**JSON_TYPE, "content-encoding": "gzip"}
    )
    assert refused.status_code == 413 and "inflates past the limit" in refused.json()["error"]
    for bad, status, message in [
        (b"not gzip at all", 422, "not valid gzip"),
        (gzip.compress(body)[:-12], 422, "ends before its stream does"),
    ]:
        response = await client.post(
            "/predict", content=bad, headers={**JSON_TYPE, "content-encoding": "gzip"}
        )
        assert response.status_code == status and message in response.json()["error"]
    brotli = await client.post(
        "/predict", content=body, headers={**JSON_TYPE, "content-encoding": "br"}
    )
    assert brotli.status_code == 415 and "send identity, gzip or deflate" in brotli.json()["error"]


async def test_a_model_answering_more_rows_than_its_batch_answers_nobody_wrongly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Right while it loads, then twice the rows for a batch of more than one: cut to the
    # batch, each client would get a neighbour's answer (x + 1, not x).
    spec = ModelSpec(
        name="twice", input=TensorSpec(shape=(4,)), output=TensorSpec(name="y", shape=(4,))
    )

    loaded = threading.Event()

    def module(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x + 1, x]) if loaded.is_set() and len(x) > 1 else x

    handler = Runner(Handler(spec, CPU, ModelSettings(path=DEMO, name="twice"), module=module))
    model = ModelSettings(path=DEMO, name="twice", warmup=False, max_wait_ms=20, freeze_gc=False)
    app = create_app(Settings(device="cpu", model=model), loader=lambda s, d: handler)
    async with serving(app) as client:
        loaded.set()
        bodies = [{"inputs": [i, 0, 0, 0]} for i in range(8)]
        answers = await asyncio.gather(*(client.post("/predict", json=b) for b in bodies))
    for body, answer in zip(bodies, answers, strict=True):
        # Its own answer (the halves retried down to one are right), or none: never another
        # client's.
        assert answer.status_code in (200, 500), answer.text
        if answer.status_code == 200:
            assert answer.json()["outputs"] == body["inputs"]
    assert any("rows for a batch of" in r.getMessage() for r in caplog.records)


async def test_integer_outputs_are_served_as_the_integers_the_model_made() -> None:
    """Not through float32: 1 stays 1, and an id past 2**24 keeps its last digit."""
    spec = ModelSpec(
        name="ids",
        input=TensorSpec(shape=(2,)),
        outputs=[
            TensorSpec(name="id", shape=(1,), dtype="int64"),
            TensorSpec(name="flag", shape=(1,), dtype="bool"),
        ],
    )
    big = 2**40 + 1

    def module(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x[:, :1].long() + big, x[:, 1:] > 0)

    handler = Runner(Handler(spec, CPU, ModelSettings(path=DEMO, name="ids"), module=module))
    model = ModelSettings(path=DEMO, name="ids", freeze_gc=False)
    app = create_app(Settings(device="cpu", model=model), loader=lambda s, d: handler)
    async with serving(app) as client:
        answer = await client.post("/predict", json={"inputs": [3, 1]})
        v2 = await client.post(
            "/v2/models/ids/infer",
            json={
                "inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [3, 0]}]
            },
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"] == {"id": [big + 3], "flag": [True]}
    assert answer.text.count(str(big + 3)) == 1 and f"{big + 3}.0" not in answer.text
    outputs = {o["name"]: o for o in v2.json()["outputs"]}
    assert outputs["id"]["datatype"] == "INT64" and outputs["id"]["data"] == [big + 3]
    assert outputs["flag"]["datatype"] == "BOOL" and outputs["flag"]["data"] == [False]
