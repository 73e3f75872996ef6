"""The error hierarchy. Each error has a kind; `protocols.status` maps every kind to each
protocol's status (HTTP's per protocol, gRPC's codes) in one table."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class ErrorKind(StrEnum):
    """What went wrong, in terms no protocol owns; each protocol answers it its own way."""

    INVALID_INPUT = "invalid_input"
    UNAUTHENTICATED = "unauthenticated"
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"
    UNSUPPORTED_MEDIA = "unsupported_media"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"
    OVERLOADED = "overloaded"
    DEADLINE = "deadline"
    CLIENT_GONE = "client_gone"
    NOT_SERVED = "not_served"
    INTERNAL = "internal"


class GpuserveError(Exception):
    """Base class: a message safe to show a client, its kind, and when to retry."""

    kind: ErrorKind = ErrorKind.INTERNAL
    retry_after_s: int | None = None

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


class InvalidInput(GpuserveError):
    """The request is malformed or does not match the model's input spec (`/predict` and
    KServe v1 answer 422, the Open Inference Protocol 400, gRPC INVALID_ARGUMENT)."""

    kind = ErrorKind.INVALID_INPUT


class ModelNotFound(GpuserveError):
    """No model of that name (or version) is served here."""

    kind = ErrorKind.NOT_FOUND


class Unauthorized(GpuserveError):
    """API keys are configured and the request did not carry a valid one."""

    kind = ErrorKind.UNAUTHENTICATED


class PayloadTooLarge(GpuserveError):
    """The body is larger than `max_body_bytes`; refused before it is parsed."""

    kind = ErrorKind.TOO_LARGE


class UnsupportedMediaType(GpuserveError):
    """The body is not declared as JSON."""

    kind = ErrorKind.UNSUPPORTED_MEDIA


class Conflict(GpuserveError):
    """The model is already being loaded or unloaded: one change at a time."""

    kind = ErrorKind.CONFLICT


class NotReady(GpuserveError):
    """The model is loading, failed to load, or the server is shutting down."""

    kind = ErrorKind.UNAVAILABLE
    retry_after_s = 1


class BatcherClosed(NotReady):
    """The batcher no longer accepts work: it is stopping, stalled, or its collector crashed."""


class Overloaded(GpuserveError):
    """The model's queue is full. Refused at once, so accepted requests keep their latency."""

    kind = ErrorKind.OVERLOADED
    retry_after_s = 1


class DeadlineExceeded(GpuserveError):
    """The request's deadline passed before its result was ready."""

    kind = ErrorKind.DEADLINE


class ClientDisconnected(GpuserveError):
    """The client hung up while its request waited; nobody reads the answer (nginx's 499)."""

    kind = ErrorKind.CLIENT_GONE


class NotServed(GpuserveError):
    """The protocol defines this call, and gpuserve does not serve it (shared memory, say)."""

    kind = ErrorKind.NOT_SERVED


class InferenceError(GpuserveError):
    """The forward pass failed. Clients see a generic message; the log has the traceback."""

    kind = ErrorKind.INTERNAL


class DeviceError(GpuserveError):
    """The requested device does not exist or cannot be used. Raised at start-up."""


class ModelLoadError(GpuserveError):
    """The model or its spec could not be loaded, or its warm-up batch failed."""


def describe_validation(exc: ValidationError, root: str, limit: int | None = None) -> str:
    """A pydantic validation error in a few words: `where: what` for each problem (the first
    `limit` of them), `root` where the problem is the whole document."""
    errors = exc.errors(include_url=False, include_input=False)
    shown = errors if limit is None else errors[:limit]
    parts = [f"{'.'.join(str(p) for p in error['loc']) or root}: {error['msg']}" for error in shown]
    if len(errors) > len(shown):
        parts.append(f"and {len(errors) - len(shown)} more")
    return "; ".join(parts)
