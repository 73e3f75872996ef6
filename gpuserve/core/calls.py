"""The one request path every protocol takes for inference: `/predict`, KServe v1, the Open
Inference Protocol over HTTP (JSON and binary) and over gRPC.

A transport describes the call (`Call`: which model, which version), says how to receive its
payload and which codec decodes it; `RequestPath.infer` does the rest, the same way for all:

1. find the model's service (NotFound, or Unavailable for an unloaded one);
2. read its spec: Unavailable while the model loads, before any payload is received;
3. receive the payload and the client's own deadline (a header, gRPC's deadline);
4. decode and check it against the spec, bounded by the model's instance limit, in a parse
   process when it is large;
5. the deadline: the model's `request_timeout_s`, or less where the client or the protocol's
   own `timeout` parameter asks for less; the queue level, from the request's priority;
6. queue on the service that now serves the route, should a reload have replaced it while
   the payload was read (the same tensors, so no request fails across a reload);
7. await the rows (through `wait`, which lets a transport cancel on a hang-up).

The batcher sits behind `ModelService.predict`: the seam where an engine in another process can
stand in without any protocol noticing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from gpuserve.core.batcher import Trace
from gpuserve.core.envelope import CallRecord
from gpuserve.core.offload import BodyDecoder
from gpuserve.core.registry import ModelRegistry
from gpuserve.core.service import ModelService
from gpuserve.spec import Instance, ModelSpec

P = TypeVar("P")


class Decoded(Protocol):
    """What every codec's decoder gives: the instances, and the deadline the body asked for."""

    @property
    def instances(self) -> list[Instance]: ...

    @property
    def timeout_s(self) -> float | None: ...

    @property
    def priority(self) -> int | None: ...


D = TypeVar("D", bound=Decoded)


class Received(NamedTuple, Generic[P]):
    """A call's payload as its transport received it, with the client's own deadline (None:
    none asked), its size (what decides whether it is decoded off the event loop) and the
    priority a transport's header asked for (None: none)."""

    payload: P
    timeout_s: float | None
    size: int
    priority: int | None = None


@dataclass(frozen=True, slots=True)
class Call:
    """Which model an inference call is for: a name (None: the default model) and a version
    (None: the one the routes without a version serve); `postprocess` False for protocols
    that answer raw tensors rather than the model's `postprocess` output."""

    model: str | None
    version: str | None = None
    postprocess: bool = True


@dataclass(frozen=True, slots=True)
class Answer(Generic[D]):
    """An answered call: the service that ran it, the spec its payload was checked against,
    the decoded payload and one row per instance."""

    service: ModelService
    spec: ModelSpec
    decoded: D
    rows: list[Any]


class RequestPath:
    """The request path, shared by every protocol and transport."""

    def __init__(self, models: ModelRegistry, offload: BodyDecoder) -> None:
        self.models = models
        self.offload = offload

    async def infer(
        self,
        call: Call,
        record: CallRecord,
        receive: Callable[[], Awaitable[Received[P]]],
        decode: Callable[[P, ModelSpec, int], D],
        wait: Callable[[Awaitable[list[Any]]], Awaitable[list[Any]]] | None = None,
    ) -> Answer[D]:
        """Run one inference call, as the module's docstring lists."""
        models = self.models
        service = models.get(
            models.default_name if call.model is None else call.model, call.version
        )
        record.model = service.key_labels  # for the metrics and the log line
        admitted = service
        spec = admitted.admit()  # NotReady while loading, before the payload is received
        try:
            received = await receive()
            settings = service.settings
            decoded = await self.offload.run(
                received.payload,
                decode,
                spec,
                settings.max_instances_per_request,
                size=received.size,
            )
            timeout_s = settings.request_timeout_s
            for asked in (received.timeout_s, decoded.timeout_s):
                if asked is not None and asked < timeout_s:
                    timeout_s = asked
            trace = record.trace = Trace(request_id=record.request_id)
            if service.retired:  # since the call found it: reloaded, or its version unloaded
                service = models.current(service, call.version, spec)
                record.model = service.key_labels
            priority = decoded.priority if decoded.priority is not None else received.priority
            level = service.default_level if priority is None else service.level_of(priority)
            work = service.predict(
                decoded.instances,
                timeout_s,
                postprocess=call.postprocess,
                trace=trace,
                level=level,
            )
            rows = await (work if wait is None else wait(work))
        finally:
            admitted.leave()
        return Answer(service, spec, decoded, rows)
