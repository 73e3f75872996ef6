"""OpenTelemetry traces: a span per call, the child of the client's W3C traceparent, with its
queue and batch, linked to a span per batch; over HTTP in-process and over gRPC on a socket."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gpuserve.core.tracing import Tracing
from gpuserve.http import create_app

from .helpers import (
    FAKE_SPEC,
    SETTINGS,
    FakeModel,
    ServerProcess,
    both,
    fake_loader,
    serving,
    wait_ready,
)

pytestmark = pytest.mark.anyio

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def traced() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return Tracing(exporter, immediate=True), exporter


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def calls(spans: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    return [span for span in spans if span.kind is SpanKind.SERVER]


async def test_a_call_is_a_child_of_its_traceparent_with_its_queue_and_batch() -> None:
    tracing, exporter = traced()
    app = create_app(SETTINGS, loader=fake_loader(FakeModel(FAKE_SPEC)), traces=tracing)
    async with serving(app) as client:
        answer = await client.post(
            "/predict",
            json={"inputs": [1, 2, 3, 4]},
            headers={"traceparent": PARENT, "x-request-id": "traced-1"},
        )
    assert answer.status_code == 200, answer.text
    spans = exporter.get_finished_spans()
    (call,) = [s for s in calls(spans) if s.attributes["gpuserve.request_id"] == "traced-1"]
    assert call.name == "POST /predict"
    assert format(call.context.trace_id, "032x") == TRACE_ID  # the client's trace
    assert call.parent is not None and format(call.parent.span_id, "016x") == "00f067aa0ba902b7"
    attributes = dict(call.attributes or {})
    assert attributes["gpuserve.protocol"] == "http"
    assert attributes["http.response.status_code"] == 200
    assert attributes["gpuserve.model"] == "digits" and attributes["gpuserve.batch.size"] == 1
    assert attributes["gpuserve.queue_ms"] >= 0 and attributes["gpuserve.pass_ms"] > 0
    # Its time in the queue, inside the call, ending as its batch began.
    (queue,) = [s for s in named(spans, "queue") if s.parent.span_id == call.context.span_id]
    (batch,) = named(spans, "batch")
    assert call.start_time <= queue.start_time <= queue.end_time == batch.start_time
    assert batch.end_time <= call.end_time
    # Linked to the batch's own span, which says what the batch was.
    assert [link.context.span_id for link in call.links] == [batch.context.span_id]
    assert batch.attributes["gpuserve.batch.size"] == 1
    assert batch.attributes["gpuserve.device"] == "cpu"
    assert batch.attributes["gpuserve.model"] == "digits"


async def test_calls_batched_together_link_to_one_batch_span_that_counts_them() -> None:
    tracing, exporter = traced()
    model = FakeModel(FAKE_SPEC)
    model.delay_s = 0.05  # a slow pass, so that the calls behind the first batch together
    app = create_app(SETTINGS, loader=fake_loader(model), traces=tracing)
    async with serving(app) as client:
        answers = await asyncio.gather(
            *(client.post("/predict", json={"inputs": [i, 0, 0, 0]}) for i in range(12))
        )
    assert all(a.status_code == 200 for a in answers)
    spans = exporter.get_finished_spans()
    batches = {s.context.span_id: s for s in named(spans, "batch")}
    served = [s for s in calls(spans) if s.attributes.get("http.route") == "/predict"]
    assert len(served) == 12
    linked: dict[int, int] = {}
    for call in served:
        (link,) = call.links
        assert link.context.span_id in batches  # every call's batch has its span
        linked[link.context.span_id] = linked.get(link.context.span_id, 0) + 1
    # Each batch span counts the calls that link to it (one instance each).
    for span_id, count in linked.items():
        assert batches[span_id].attributes["gpuserve.batch.size"] == count
    assert max(linked.values()) > 1  # some calls did share a batch
    assert sorted(model.batches) == sorted(linked.values())


async def test_a_refused_call_has_a_span_without_a_batch_and_a_server_error_is_an_error() -> None:
    tracing, exporter = traced()
    model = FakeModel(FAKE_SPEC)
    app = create_app(SETTINGS, loader=fake_loader(model), traces=tracing)
    async with serving(app) as client:
        bad = await client.post("/predict", json={"inputs": [1, 2]})
        model.error = RuntimeError("the model broke")
        broken = await client.post("/predict", json={"inputs": [1, 2, 3, 4]})
    assert (bad.status_code, broken.status_code) == (422, 500)
    by_status = {
        s.attributes["http.response.status_code"]: s
        for s in calls(exporter.get_finished_spans())
        if s.attributes.get("http.route") == "/predict"
    }
    refused, failed = by_status[422], by_status[500]
    assert not refused.links and refused.status.status_code is StatusCode.UNSET
    assert failed.status.status_code is StatusCode.ERROR
    assert refused.parent is None  # no traceparent sent: a trace of its own


async def test_without_traces_nothing_is_read_or_written() -> None:
    app = create_app(SETTINGS, loader=fake_loader(FakeModel(FAKE_SPEC)))
    async with serving(app) as client:
        answer = await client.post(
            "/predict", json={"inputs": [1, 2, 3, 4]}, headers={"traceparent": PARENT}
        )
        assert answer.status_code == 200
        assert app.state.metrics.traces is None


@pytest.mark.integration
async def test_a_grpc_call_is_traced_from_its_metadata() -> None:
    tracing, exporter = traced()
    async with both(SETTINGS, loader=fake_loader(FakeModel(FAKE_SPEC)), traces=tracing) as servers:
        client: Any = triton_aio.InferenceServerClient(servers.url)
        try:
            tensor = triton_aio.InferInput("x", [1, 4], "FP32")
            tensor.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
            await client.infer("digits", [tensor], headers={"traceparent": PARENT})
        finally:
            await client.close()
    grpc_calls = [s for s in calls(exporter.get_finished_spans()) if "rpc.system" in s.attributes]
    (call,) = [s for s in grpc_calls if s.attributes["rpc.method"].endswith("/ModelInfer")]
    assert format(call.context.trace_id, "032x") == TRACE_ID
    assert (
        call.attributes["rpc.grpc.status"] == "OK"
        and call.attributes["gpuserve.protocol"] == "grpc"
    )
    assert len(call.links) == 1


class Collector:
    """An OTLP/HTTP receiver on loopback: what an OpenTelemetry collector is to the server.
    Keeps each exported span as (service name, span name, trace id hex, attributes)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str, dict[str, Any]]] = []
        self.paths: list[str] = []
        collector = self

        class Receiver(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                collector.paths.append(self.path)
                for resource_spans in request.resource_spans:
                    resource = {
                        a.key: a.value.string_value for a in resource_spans.resource.attributes
                    }
                    for scope in resource_spans.scope_spans:
                        for span in scope.spans:
                            attributes = {a.key: a.value for a in span.attributes}
                            collector.spans.append(
                                (
                                    resource["service.name"],
                                    span.name,
                                    span.trace_id.hex(),
                                    attributes,
                                )
                            )
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Collector:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.mark.integration
def test_a_served_process_exports_its_spans_to_a_collector_over_otlp() -> None:
    with Collector() as collector:
        env = {
            "GPUSERVE_TRACES": "true",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_SERVICE_NAME": "digits-server",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }
        with ServerProcess("--device", "cpu", env=env) as server:
            wait_ready(server.url)
            answer = httpx.post(
                f"{server.url}/predict",
                json={"inputs": [0.0] * 64},
                headers={"traceparent": PARENT},
            )
            assert answer.status_code == 200, answer.text
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any(
                name == "POST /predict" for _, name, _, _ in collector.spans
            ):
                time.sleep(0.05)
        services = {service for service, _, _, _ in collector.spans}
        names = {name for _, name, _, _ in collector.spans}
        (call,) = [s for s in collector.spans if s[1] == "POST /predict"]
    assert collector.paths and set(collector.paths) == {"/v1/traces"}
    assert services == {"digits-server"}  # OTEL_SERVICE_NAME, read by the SDK
    assert {"POST /predict", "queue", "batch"} <= names
    assert call[2] == TRACE_ID
    assert call[3]["gpuserve.model"].string_value == "digits"


async def test_the_standard_sampler_variable_is_obeyed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    tracing, exporter = traced()  # the SDK reads OTEL_* as the server starts it
    app = create_app(SETTINGS, loader=fake_loader(FakeModel(FAKE_SPEC)), traces=tracing)
    async with serving(app) as client:
        answer = await client.post("/predict", json={"inputs": [1, 2, 3, 4]})
    assert answer.status_code == 200
    assert exporter.get_finished_spans() == ()
