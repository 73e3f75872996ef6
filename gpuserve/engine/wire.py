"""What crosses between a front and the engine, and how it is packed.

A message is a kind (one byte string) and a payload pickled with protocol 5: large numpy
arrays travel out of band, as frames of their own that ZeroMQ sends without copying them into
the payload. Both ends are processes of the same server, started by it, on a socket in a folder
only its user can reach: pickle's trust is theirs.
"""

from __future__ import annotations

import asyncio
import pickle
from dataclasses import dataclass, field
from typing import Any

import zmq

from gpuserve.core import errors
from gpuserve.core.batcher import Trace

HELLO = b"hello"  # front -> engine: send me every model's state
INFER = b"infer"  # front -> engine: a list of Request
ABORT = b"abort"  # front -> engine: request ids whose callers are gone
STATES = b"states"  # engine -> front: a list of ModelState
ANSWERS = b"answers"  # engine -> front: a list of Answer


@dataclass(slots=True)
class Request:
    """One call's instances for one model, and when it stops being worth answering
    (`time.monotonic()`, which every process of the machine shares)."""

    id: int
    model: tuple[str, str]  # (name, version)
    instances: list[Any]
    deadline: float
    postprocess: bool = True
    request_id: str = ""  # the client's, for the engine's log lines
    level: int = 0  # its queue level (priority), as the front worked it out


# What a request's batches cost, sent back with its answer: the pass's start is on the
# machine's monotonic clock, which every process shares; `links` are the batches' span
# contexts, where traces are on.
TRACE_FIELDS = ("batches", "batch_size", "queue_wait_s", "forward_s", "started", "links")


def trace_fields(trace: Trace) -> tuple[Any, ...]:
    """A Trace's TRACE_FIELDS, to send."""
    return tuple([getattr(trace, name) for name in TRACE_FIELDS])


def fill_trace(trace: Trace, fields: tuple[Any, ...]) -> None:
    """Set a Trace's TRACE_FIELDS from what `trace_fields` sent (nothing, when empty)."""
    for name, value in zip(TRACE_FIELDS, fields, strict=False):
        setattr(trace, name, value)


@dataclass(slots=True)
class Answer:
    """A request's rows, or its error; and what its batches cost, for the front's logs and
    statistics."""

    id: int
    rows: list[Any] | None = None
    error: tuple[str, str, int | None] | None = None  # (class name, message, retry after)
    trace: tuple[Any, ...] = ()  # its Trace's TRACE_FIELDS, as `trace_fields` reads them


@dataclass(slots=True)
class ModelState:
    """A model's state in the engine, and what a front needs to serve it once ready."""

    model: tuple[str, str]
    state: str
    reason: str | None = None
    spec: Any = None  # ModelSpec, once loaded
    devices: list[Any] = field(default_factory=list)  # DeviceInfo, the first the main one
    max_batch_size: int = 0
    copies: int = 0
    progress: dict[str, Any] | None = None


# Arrays this large travel as frames of their own; smaller ones are copied into the payload,
# cheaper than a frame each (a row of ten floats is 40 bytes).
_OUT_OF_BAND_BYTES = 64 * 1024


def pack(kind: bytes, payload: Any) -> list[Any]:
    """The frames of one message: its kind, the pickled payload, then each large array's
    buffer."""
    buffers: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        raw = buffer.raw()
        if raw.nbytes < _OUT_OF_BAND_BYTES:
            return True  # in the payload
        buffers.append(raw)
        return False

    body = pickle.dumps(payload, protocol=5, buffer_callback=out_of_band)
    return [kind, body, *buffers]


def unpack(frames: list[Any]) -> tuple[bytes, Any]:
    """The kind and payload of a message received as frames (bytes or zmq frames)."""
    kind = bytes(frames[0])
    payload = pickle.loads(frames[1], buffers=[memoryview(f) for f in frames[2:]])
    return kind, payload


def error_of(exc: BaseException) -> tuple[str, str, int | None]:
    """An error as it crosses: gpuserve's own keep their class and message; anything else
    is a failed inference (its traceback stays in the engine's log)."""
    if isinstance(exc, errors.GpuserveError):
        return type(exc).__name__, exc.message, exc.retry_after_s
    return "InferenceError", "inference failed", None


def error_from(error: tuple[str, str, int | None]) -> errors.GpuserveError:
    """The error a front raises for one that crossed."""
    name, message, retry_after_s = error
    kind = getattr(errors, name, None)
    if not (isinstance(kind, type) and issubclass(kind, errors.GpuserveError)):
        kind = errors.InferenceError
    return kind(message, retry_after_s)


def send_now(sock: Any, frames: list[Any]) -> asyncio.Future[Any]:
    """Send a message without waiting (zmq's NOBLOCK) through an asyncio socket; the future
    fails when no peer can take it. Every send goes through the asyncio socket: one through
    another handle could take the edge of the event descriptor its receiver waits for."""
    sending: asyncio.Future[Any] = sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
    return sending


def ignore_failure(sending: asyncio.Future[Any]) -> None:
    """For a send whose failure (no peer to take it) changes nothing."""
    if not sending.cancelled():
        sending.exception()
