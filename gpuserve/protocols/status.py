"""The one table from an error's kind to what each protocol answers.

`/predict` and KServe v1 answer invalid input with 422 (FastAPI's and KServe's own choice);
the Open Inference Protocol says 400. gRPC's codes are named here as strings, so that this
table needs no grpc import; the gRPC transport looks each name up in `grpc.StatusCode`.
"""

from __future__ import annotations

from enum import StrEnum

from gpuserve.core.errors import ErrorKind


class Protocol(StrEnum):
    """The protocols gpuserve speaks, as far as their answers to errors differ."""

    PREDICT = "predict"  # gpuserve's own /predict and /models/..., and KServe v1
    OIP = "oip"  # the Open Inference Protocol over HTTP (/v2/...)
    GRPC = "grpc"  # the Open Inference Protocol over gRPC


_HTTP: dict[ErrorKind, int] = {
    ErrorKind.INVALID_INPUT: 422,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.UNSUPPORTED_MEDIA: 415,
    ErrorKind.CONFLICT: 409,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.OVERLOADED: 503,
    ErrorKind.DEADLINE: 504,
    ErrorKind.CLIENT_GONE: 499,  # nginx's code: nobody reads it, but logs and metrics do
    ErrorKind.NOT_SERVED: 501,
    ErrorKind.INTERNAL: 500,
}
_OIP: dict[ErrorKind, int] = {**_HTTP, ErrorKind.INVALID_INPUT: 400}

GRPC_CODES: dict[ErrorKind, str] = {
    ErrorKind.INVALID_INPUT: "INVALID_ARGUMENT",
    ErrorKind.UNAUTHENTICATED: "UNAUTHENTICATED",
    ErrorKind.NOT_FOUND: "NOT_FOUND",
    ErrorKind.TOO_LARGE: "RESOURCE_EXHAUSTED",
    ErrorKind.UNSUPPORTED_MEDIA: "INVALID_ARGUMENT",
    ErrorKind.CONFLICT: "ABORTED",
    ErrorKind.UNAVAILABLE: "UNAVAILABLE",
    ErrorKind.OVERLOADED: "RESOURCE_EXHAUSTED",  # gRPC's own word for a full queue
    ErrorKind.DEADLINE: "DEADLINE_EXCEEDED",
    ErrorKind.CLIENT_GONE: "CANCELLED",
    ErrorKind.NOT_SERVED: "UNIMPLEMENTED",
    ErrorKind.INTERNAL: "INTERNAL",
}
_BY_PROTOCOL = {Protocol.PREDICT: _HTTP, Protocol.OIP: _OIP}


def http_status(kind: ErrorKind, protocol: Protocol = Protocol.PREDICT) -> int:
    """The HTTP status of an error of `kind` under `protocol`."""
    return _BY_PROTOCOL[protocol][kind]


def http_protocol(route: str) -> Protocol:
    """Which protocol an HTTP route (its path template) speaks."""
    return Protocol.OIP if route.startswith("/v2") else Protocol.PREDICT
