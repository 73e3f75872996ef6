"""OpenTelemetry traces: a span per call and a span per batch, the call's linked to its batch.

Off unless `traces` is set; then spans go out over OTLP (HTTP and protobuf), configured by the
standard `OTEL_*` variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`,
`OTEL_TRACES_SAMPLER`, ...), read by OpenTelemetry's SDK when the server starts.

Spans are written once their work is over, with the times it happened at, so that the request
path carries no open span across its awaits and pays nothing while tracing is off:

- **the call** (kind SERVER), when the envelope closes it: its protocol, route, model,
  version, request id, status, batch size, queue and pass milliseconds; the child of a W3C
  `traceparent` the client sent (an HTTP header, or gRPC metadata); with a child, `queue`
  (its instances waiting for their batch), and a link to its batch's span;
- **the batch**, when it is done: its size, the model copy and device that ran it, the
  oldest instance's queue time, the pass time (collate, copy, forward and the copy back,
  measured as one), failed instances and out-of-memory splits.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from gpuserve.core.batcher import BatchStats
    from gpuserve.core.envelope import CallRecord

_PROPAGATOR = TraceContextTextMapPropagator()
_GRPC_OK = "OK"


class Tracing:
    """Writes gpuserve's spans to `exporter`: in batches from a thread of the SDK's (the
    server's way), or, with `immediate`, as each span ends (tests)."""

    def __init__(self, exporter: SpanExporter, *, immediate: bool = False) -> None:
        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "gpuserve"}))
        self._provider = TracerProvider(resource=resource)
        processor = SimpleSpanProcessor(exporter) if immediate else BatchSpanProcessor(exporter)
        self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer("gpuserve")
        # The batcher keeps time.monotonic(); spans take nanoseconds since the epoch.
        self._epoch_ns = time.time_ns() - time.monotonic_ns()

    @classmethod
    def over_otlp(cls) -> Tracing:
        """Spans exported over OTLP/HTTP as the `OTEL_*` variables say (default: a collector
        on localhost:4318). Needs the `traces` extra (`pip install gpuserve[traces]`)."""
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise RuntimeError(
                "traces = true needs the OTLP exporter: pip install 'gpuserve[traces]'"
            ) from exc
        return cls(OTLPSpanExporter())

    def batch(self, model: str, version: str, device: str, stats: BatchStats) -> Any:
        """A finished batch's span; returns its context, for its calls to link to."""
        start = self._wall(stats.started)
        span = self._tracer.start_span(
            "batch",
            kind=SpanKind.INTERNAL,
            attributes={
                "gpuserve.model": model,
                "gpuserve.model_version": version,
                "gpuserve.batch.size": stats.size,
                "gpuserve.batch.copy": stats.worker,
                "gpuserve.device": device,
                "gpuserve.batch.queue_ms": stats.queue_wait_s * 1e3,
                "gpuserve.batch.pass_ms": stats.forward_s * 1e3,
                "gpuserve.batch.failed_instances": stats.failed_items,
                "gpuserve.batch.oom_splits": stats.oom_splits,
            },
            start_time=start,
        )
        span.end(end_time=start + int(stats.forward_s * 1e9))
        return span.get_span_context()

    def call(
        self,
        record: CallRecord,
        protocol: str,
        method: str,
        route: str,
        status: int | str,
        seconds: float,
    ) -> None:
        """A call's span, written as its envelope closes it `seconds` after it arrived."""
        end = time.time_ns()
        batched = record.trace
        attributes: dict[str, Any] = {
            "gpuserve.protocol": protocol,
            "gpuserve.request_id": record.request_id,
        }
        if protocol == "grpc":
            attributes["rpc.system"] = "grpc"
            attributes["rpc.method"] = route
            attributes["rpc.grpc.status"] = str(status)
            failed = status != _GRPC_OK
        else:
            attributes["http.request.method"] = method
            attributes["http.route"] = route
            attributes["http.response.status_code"] = status
            failed = isinstance(status, int) and status >= 500
        if record.model is not None:
            attributes["gpuserve.model"], attributes["gpuserve.model_version"] = record.model
        links: tuple[Link, ...] = ()
        if batched is not None and batched.batches:
            attributes["gpuserve.batch.size"] = batched.batch_size
            attributes["gpuserve.queue_ms"] = batched.queue_wait_s * 1e3
            attributes["gpuserve.pass_ms"] = batched.forward_s * 1e3
            links = tuple(Link(context) for context in batched.links)
        span = self._tracer.start_span(
            f"{method} {route}" if protocol != "grpc" else route,
            context=_parent(record.parent),
            kind=SpanKind.SERVER,
            attributes=attributes,
            links=links,
            start_time=end - int(seconds * 1e9),
        )
        if not span.is_recording():  # not sampled: nothing more to write
            return
        if failed:
            span.set_status(Status(StatusCode.ERROR, f"status {status}"))
        if batched is not None and batched.batches and batched.started:
            # The wait as a span of its own, for a trace view's timeline; the pass is the
            # linked batch's span (a child for it too cost a third more per call).
            began = self._wall(batched.started)
            queued = self._tracer.start_span(
                "queue",
                context=trace.set_span_in_context(span),
                start_time=began - int(batched.queue_wait_s * 1e9),
            )
            queued.end(end_time=began)
        span.end(end_time=end)

    def close(self) -> None:
        """Export what is left and stop (the server is stopping)."""
        self._provider.shutdown()

    def _wall(self, monotonic_s: float) -> int:
        return int(monotonic_s * 1e9) + self._epoch_ns


def _parent(carrier: dict[str, str] | None) -> Any:
    """The context of a W3C `traceparent` (and `tracestate`) a client sent, or None."""
    if not carrier:
        return None
    return _PROPAGATOR.extract(carrier)
