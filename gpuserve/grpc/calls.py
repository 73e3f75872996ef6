"""Every gRPC call inside the core's per-call envelope: its id (sent back as `x-request-id`
metadata), the API key check, its status from the error's kind (`protocols.status`), metrics
and an access log line. The inference and health services both run their calls here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from gpuserve.core.envelope import CallRecord, Envelope
from gpuserve.core.errors import ErrorKind, GpuserveError, Unauthorized
from gpuserve.grpc.bridge import Aborted, LoopContext
from gpuserve.protocols.status import GRPC_CODES

logger = logging.getLogger("gpuserve.grpc")

R = TypeVar("R")

# The calls a probe makes; like HTTP's health routes, they need no API key.
_OPEN = frozenset({"ServerLive", "ServerReady", "Check", "Watch"})


def status_of(exc: GpuserveError) -> grpc.StatusCode:
    """The gRPC status of one of gpuserve's errors."""
    return grpc.StatusCode[GRPC_CODES[exc.kind]]


class GrpcCalls:
    """Runs gRPC calls in the envelope of the transport's `Envelope`."""

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope

    async def call(
        self,
        service: str,
        method: str,
        context: LoopContext,
        work: Callable[[CallRecord], Awaitable[R] | R],
    ) -> R:
        """Run `work` as the call `method` of `service` (the route in the metrics is
        `/service/method`); only inference (ModelInfer) counts toward a model's series."""
        metadata = dict(context.invocation_metadata() or ())
        envelope = self.envelope
        parent: dict[str, str] | None = None
        if envelope.tracing:
            parent = {k: str(metadata[k]) for k in ("traceparent", "tracestate") if k in metadata}
        record = envelope.open(metadata.get("x-request-id"), parent)
        request_id = record.request_id
        context.set_trailing_metadata((("x-request-id", request_id),))
        status = grpc.StatusCode.OK
        try:
            if method not in _OPEN:
                presented = metadata.get("authorization")
                if not envelope.admits(None if presented is None else str(presented).encode()):
                    raise Unauthorized(
                        "a valid API key is required ('authorization: Bearer <key>')"
                    )
            reply = work(record)
            if asyncio.iscoroutine(reply):
                reply = await reply
            return reply  # type: ignore[return-value]
        except GpuserveError as exc:
            status = status_of(exc)
            if exc.kind is ErrorKind.INTERNAL:
                logger.error(
                    "call %s failed: %s", request_id, exc.message, exc_info=exc.__cause__ or exc
                )
            await context.abort(status, f"{exc.message} (request id {request_id})")
            raise  # abort raises; this line is never reached
        except asyncio.CancelledError:
            # The client cancelled, its deadline passed, or the server's stop ran out of time:
            # grpc answers the client; the instances leave the queue with this task.
            status = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            if isinstance(exc, Aborted):
                raise
            # A bug (ours, or in a user's hook): the client gets a request id, the log the rest.
            status = grpc.StatusCode.INTERNAL
            logger.error("call %s failed unexpectedly", request_id, exc_info=exc)
            await context.abort(status, f"internal error (request id {request_id})")
            raise
        finally:
            route = f"/{service}/{method}"
            infer = method == "ModelInfer"
            probe = method in _OPEN
            envelope.close(
                record, "GRPC", route, route, status.name, count_model=infer, probe=probe
            )
