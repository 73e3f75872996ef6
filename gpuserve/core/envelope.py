"""The per-call envelope every transport wraps around a call, HTTP request or gRPC call alike:
its id, the API key check, the in-flight gauge, the request metrics and the access log line.

A transport opens a `CallRecord` when the call arrives, lets the request path fill in the
model and the batch's trace, and closes it with the status it answered. What differs between
transports (how an error is written, how a hang-up is noticed) stays in the transport.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import re
import time
import uuid
from typing import Any

from gpuserve.core.batcher import Trace
from gpuserve.core.metrics import Metrics
from gpuserve.logs import access

# A random prefix per process and a counter: unique like uuid4, without a syscall per request.
_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count(1)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class CallRecord:
    """One call from arrival to its log line: its id, the model it reached (name, version)
    and what its batches cost (the trace)."""

    __slots__ = ("model", "parent", "request_id", "started", "trace")

    def __init__(self, request_id: str, parent: dict[str, str] | None = None) -> None:
        self.request_id = request_id
        self.model: tuple[str, str] | None = None
        self.trace: Trace | None = None
        self.started = time.perf_counter()
        # The W3C trace context the client sent (traceparent, tracestate), for its span.
        self.parent = parent


class Envelope:
    """Opens and closes the calls of one transport (`protocol`: "http" or "grpc")."""

    def __init__(
        self, metrics: Metrics, api_keys: list[str], access_log: bool, protocol: str
    ) -> None:
        self.metrics = metrics
        self.keys = [key.encode() for key in api_keys]
        self.access_log = access_log
        self.protocol = protocol

    def open(self, offered_id: str | None, parent: dict[str, str] | None = None) -> CallRecord:
        """A call has arrived, with the id its client offered (or None) and the W3C trace
        context it sent (None: none, or traces are off)."""
        self.metrics.in_flight.inc()
        if offered_id is None:  # most calls: a fresh id
            return CallRecord(new_request_id(), parent)
        return CallRecord(request_id_from(offered_id), parent)

    @property
    def tracing(self) -> bool:
        """Whether calls are traced: then a transport reads their W3C trace context."""
        return self.metrics.traces is not None

    def admits(self, authorization: bytes | None) -> bool:
        """Whether a call that carried this Authorization value (HTTP's header, gRPC's
        metadata) may go on: always, where no API key is configured."""
        if not self.keys:
            return True
        return authorization is not None and authorised(authorization, self.keys)

    def close(
        self,
        record: CallRecord,
        method: str,
        path: str,
        route: str,
        status: int | str,
        *,
        count_model: bool = True,
        probe: bool = False,
    ) -> None:
        """The call was answered with `status` (an HTTP code or a gRPC status name): count it
        under `route` (bounded in number, unlike `path`) and write its access log line.
        `count_model` False keeps a call that only named a model (metadata, say) out of that
        model's series and statistics, which count inference. A `probe` (health checks, a
        metrics scrape) is logged at DEBUG: orchestrators send one every few seconds."""
        self.metrics.in_flight.dec()
        seconds = time.perf_counter() - record.started
        model, version = record.model if count_model and record.model else ("", "")
        trace = record.trace
        # A call that ran in a batch adds its queue time and its batch's compute time.
        queue_s, compute_s = (
            (trace.queue_wait_s, trace.forward_s)
            if trace is not None and trace.batches
            else (None, 0.0)
        )
        self.metrics.observe_request(
            route, status, seconds, model, self.protocol, version, queue_s, compute_s
        )
        level = logging.DEBUG if probe else logging.INFO
        if self.access_log and access.isEnabledFor(level):
            log_call(method, path, record, status, seconds, level)
        traces = self.metrics.traces
        if traces is not None and not probe:
            traces.call(record, self.protocol, method, route, status, seconds)


def authorised(authorization: bytes, keys: list[bytes]) -> bool:
    """Whether an Authorization value ("Bearer <key>") carries one of `keys`."""
    presented = authorization[7:].strip() if authorization[:7].lower() == b"bearer " else b""
    # Compare against every key, in constant time, so timing reveals neither key nor match.
    matches = [hmac.compare_digest(presented, key) for key in keys]
    return any(matches)


def log_call(
    method: str,
    path: str,
    record: CallRecord,
    status: int | str,
    seconds: float,
    level: int = logging.INFO,
) -> None:
    """The access log line of one call, HTTP (status a code) or gRPC (a status name)."""
    fields: dict[str, Any] = {
        "request_id": record.request_id,
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
    }
    trace = record.trace
    detail = ""
    if record.model is not None:
        model, version = record.model
        fields["model"] = model
        detail = f" model={model}"
        if version:
            fields["version"] = version
            detail += f" version={version}"
    if trace is not None and trace.batches:
        fields["batch_size"] = trace.batch_size
        fields["queue_ms"] = round(trace.queue_wait_s * 1000, 3)
        fields["forward_ms"] = round(trace.forward_s * 1000, 3)
        detail += (
            f" batch={trace.batch_size} queue={fields['queue_ms']:.1f}ms"
            f" forward={fields['forward_ms']:.1f}ms"
        )
    access.log(
        level,
        "%s %s %s %.1fms id=%s%s",
        method,
        path,
        status,
        seconds * 1000,
        record.request_id,
        detail,
        extra=fields,
    )


def request_id_from(candidate: str | None) -> str:
    """The id a client sent (X-Request-Id, or gRPC's x-request-id metadata) when it is a
    plain one that logs can carry; a fresh one otherwise."""
    if candidate is not None and _REQUEST_ID.match(candidate):
        return candidate
    return new_request_id()


def new_request_id() -> str:
    """A fresh id for a call that brought none of its own."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"
