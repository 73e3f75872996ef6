"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService`, as Triton and
KServe serve it, so their gRPC clients work as they are.

A thin codec like the HTTP routes: a call's fields become the same dicts `oip` checks for
JSON, its instances go through the model's batcher (`ModelService.predict`), and the rows
come back as raw output contents. It runs on the server's event loop (grpc.aio) on its own
port, and each call gets what an HTTP request gets: a request id, the API key check, the
deadline, metrics (protocol="grpc") and an access log line.

The messages and the service come from tritonclient's generated modules, compiled by Triton
from its own grpc_service.proto, the protocol's reference: the wire format is Triton's by
construction, and nothing generated is kept in this repository.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gpuserve.config import Settings
from gpuserve.core.batcher import Trace
from gpuserve.core.errors import (
    BadRequest,
    GpuserveError,
    ModelNotFound,
    Overloaded,
    Unauthorized,
)
from gpuserve.core.metrics import Metrics
from gpuserve.core.registry import ModelRegistry
from gpuserve.core.service import ModelService
from gpuserve.grpc.health import health_handler
from gpuserve.http import repository
from gpuserve.http.context import NO_MODEL, authorised, log_request, request_id_from
from gpuserve.http.v2 import metadata_of, model_config_of, statistics_of
from gpuserve.logs import access
from gpuserve.protocols import oip
from gpuserve.spec import TensorSpec
from gpuserve.version import __version__

logger = logging.getLogger("gpuserve.grpc")

SERVICE = "inference.GRPCInferenceService"
# The calls a probe makes; like HTTP's health routes, they need no API key.
_OPEN = frozenset({"ServerLive", "ServerReady", "Check", "Watch"})  # health: no key
# gRPC's status for each HTTP status an error carries (one map, beside HTTP's own).
_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Typed contents: the field of InferTensorContents each datatype travels in, and that field's
# own element type (the spec check then casts, as for JSON). FP16 and BF16 have none: they
# travel as raw contents only.
_CONTENTS: dict[str, tuple[str, Any]] = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int32),
    "INT16": ("int_contents", np.int32),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint32),
    "UINT16": ("uint_contents", np.uint32),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
    "BYTES": ("bytes_contents", object),
}

_Reply = TypeVar("_Reply", bound=Message)


def status_of(exc: GpuserveError) -> grpc.StatusCode:
    """The gRPC status of one of gpuserve's errors."""
    if isinstance(exc, Overloaded):  # a full queue: 503 over HTTP, its own status here
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return _STATUS.get(exc.status_code, grpc.StatusCode.UNKNOWN)


class GrpcServer:
    """The gRPC endpoint: started beside uvicorn on the same loop, stopped with it.

    Messages are bounded like HTTP bodies, by `max_body_bytes`. With `share_port` (worker
    processes side by side) it listens with SO_REUSEPORT, and the kernel spreads the
    connections over the workers.
    """

    def __init__(
        self,
        settings: Settings,
        models: ModelRegistry,
        metrics: Metrics,
        *,
        share_port: bool = False,
    ) -> None:
        self.settings = settings
        options = [
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            # gRPC shares a port by default (SO_REUSEPORT), so a second server on a port
            # already in use would start and get half the calls: fail instead, unless the
            # sharing is meant.
            ("grpc.so_reuseport", 1 if share_port else 0),
        ]
        self._server = grpc.aio.server(options=options)
        inference = InferenceService(settings, models, metrics)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, self._server)
        self._server.add_generic_rpc_handlers((health_handler(inference, models),))
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen on `host:port` (0: a port the OS picks) and serve; returns the port."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc says only "Failed to bind"
            raise OSError(f"gRPC cannot listen on {address}: {exc}") from None
        await self._server.start()
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let those in progress finish for up to `grace_s`, then cancel
        what is left (its clients get CANCELLED)."""
        await self._server.stop(grace_s)


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's calls. The base class answers UNIMPLEMENTED to the ones gpuserve does
    not serve (shared memory, trace and log settings, streaming)."""

    def __init__(self, settings: Settings, models: ModelRegistry, metrics: Metrics) -> None:
        self._settings = settings
        self._models = models
        self._metrics = metrics
        self._keys = [key.encode() for key in settings.api_key_values()]

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self.call("ServerLive", context, lambda _: pb.ServerLiveResponse(live=True))

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def ready(_: dict[str, Any]) -> Any:
            return pb.ServerReadyResponse(ready=self._models.status == "ready")

        return await self.call("ServerReady", context, ready)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def ready(state: dict[str, Any]) -> Any:
            service = self._service(request.name, request.version or None, state)
            return pb.ModelReadyResponse(ready=service.state == "ready")

        return await self.call("ModelReady", context, ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def metadata(_: dict[str, Any]) -> Any:
            extensions = list(oip.EXTENSIONS)
            if self._settings.repository_api:
                extensions.append(oip.REPOSITORY_EXTENSION)
            return pb.ServerMetadataResponse(
                name="gpuserve", version=__version__, extensions=extensions
            )

        return await self.call("ServerMetadata", context, metadata)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def metadata(state: dict[str, Any]) -> Any:
            name, version = self._model(request.name, request.version, state)
            body = metadata_of(self._models, name, version)
            return json_format.ParseDict(body, pb.ModelMetadataResponse())

        return await self.call("ModelMetadata", context, metadata)

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def config(state: dict[str, Any]) -> Any:
            name, version = self._model(request.name, request.version, state)
            config = model_config_of(self._models, name, version)
            return json_format.ParseDict({"config": config}, pb.ModelConfigResponse())

        return await self.call("ModelConfig", context, config)

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def statistics(state: dict[str, Any]) -> Any:
            name, version = self._model(request.name, request.version, state)
            stats = statistics_of(self._models, name or None, version)
            return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

        return await self.call("ModelStatistics", context, statistics)

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def index(_: dict[str, Any]) -> Any:
            self._repository_on()
            entries = repository.index_entries(self._models)
            if request.ready:
                entries = [entry for entry in entries if entry["state"] == "READY"]
            return json_format.ParseDict({"models": entries}, pb.RepositoryIndexResponse())

        return await self.call("RepositoryIndex", context, index)

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def load(state: dict[str, Any]) -> Any:
            self._repository_on()
            state["model"] = (request.model_name, "")
            if request.parameters:
                names = ", ".join(sorted(request.parameters))
                raise BadRequest(f"load parameters are not supported: {names}")
            await repository.load_model(self._models, self._settings, request.model_name)
            return pb.RepositoryModelLoadResponse()

        return await self.call("RepositoryModelLoad", context, load)

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def unload(state: dict[str, Any]) -> Any:
            self._repository_on()
            state["model"] = (request.model_name, "")
            await self._models.unload(request.model_name, self._settings.shutdown_timeout_s)
            return pb.RepositoryModelUnloadResponse()

        return await self.call("RepositoryModelUnload", context, unload)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def infer(state: dict[str, Any]) -> Any:
            return await self._infer(request, context, state)

        return await self.call("ModelInfer", context, infer)

    async def _infer(
        self, request: Any, context: grpc.aio.ServicerContext, state: dict[str, Any]
    ) -> Any:
        version = request.model_version or None
        service = self._service(request.model_name, version, state)
        spec = service.spec  # UNAVAILABLE while loading
        timeout_s = service.settings.request_timeout_s
        left_s = context.time_remaining()  # the client's deadline, if it set one
        if left_s is not None:
            timeout_s = min(timeout_s, left_s)
        limit = service.settings.max_instances_per_request
        decoded = oip.decode_fields(_fields(request), spec, _reader(request, limit))
        if decoded.timeout_s is not None:
            timeout_s = min(timeout_s, decoded.timeout_s)
        trace = state["trace"] = Trace()
        if service.retired:  # since the call found it: reloaded, or its version unloaded
            service = self._models.current(service, version, spec)
            state["model"] = service.labels
        rows = await service.predict(decoded.instances, timeout_s, postprocess=False, trace=trace)
        # Raw contents for every output, as Triton answers (gRPC has no JSON to choose).
        tensors = oip.output_tensors(spec, rows, decoded.outputs)
        return pb.ModelInferResponse(
            model_name=spec.name,
            model_version=service.version,
            id=decoded.id if decoded.id is not None else state["request_id"],
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name=tensor.name, datatype=tensor.datatype, shape=tensor.shape
                )
                for tensor in tensors
            ],
            raw_output_contents=[tensor.raw() for tensor in tensors],
        )

    def _service(self, name: str, version: str | None, state: dict[str, Any]) -> ModelService:
        service = self._models.get(name, version)
        state["model"] = service.labels
        return service

    def _model(self, name: str, version: str, state: dict[str, Any]) -> tuple[str, str | None]:
        """A request's model name and version (None: not given), for the access log."""
        if name:
            state["model"] = (name, version)
        return name, version or None

    def _repository_on(self) -> None:
        if not self._settings.repository_api:
            raise ModelNotFound("the repository API is off (set repository_api to turn it on)")

    async def call(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        work: Callable[[dict[str, Any]], Awaitable[_Reply] | _Reply],
        service: str = SERVICE,
    ) -> _Reply:
        """Run one call the way the HTTP middleware runs a request: its id (sent back as
        `x-request-id` metadata), the key check, the error's status, metrics and a log line.
        `service` names the gRPC service in the metrics' route (the health service's too)."""
        metadata = dict(context.invocation_metadata() or ())
        state: dict[str, Any] = {"request_id": request_id_from(metadata.get("x-request-id"))}
        request_id = state["request_id"]
        context.set_trailing_metadata((("x-request-id", request_id),))
        status = grpc.StatusCode.OK
        started = time.perf_counter()
        self._metrics.in_flight.inc()
        try:
            if self._keys and method not in _OPEN:
                presented = str(metadata.get("authorization", "")).encode()
                if not authorised(presented, self._keys):
                    raise Unauthorized(
                        "a valid API key is required ('authorization: Bearer <key>')"
                    )
            reply = work(state)
            if asyncio.iscoroutine(reply):
                reply = await reply
            return reply  # type: ignore[return-value]
        except GpuserveError as exc:
            status = status_of(exc)
            if exc.status_code == 500:
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
            if isinstance(exc, grpc.aio.AbortError):
                raise
            # A bug (ours, or in a user's hook): the client gets a request id, the log the rest.
            status = grpc.StatusCode.INTERNAL
            logger.error("call %s failed unexpectedly", request_id, exc_info=exc)
            await context.abort(status, f"internal error (request id {request_id})")
            raise
        finally:
            self._metrics.in_flight.dec()
            seconds = time.perf_counter() - started
            route = f"/{service}/{method}"
            # As over HTTP, only inference counts toward a model's series and statistics.
            infer = method == "ModelInfer"
            model, version = state.get("model", NO_MODEL) if infer else NO_MODEL
            self._metrics.observe_request(route, status.name, seconds, model, "grpc", version)
            if self._settings.access_log and access.isEnabledFor(logging.INFO):
                log_request("GRPC", route, state, status.name, seconds)


def _fields(request: Any) -> dict[str, Any]:
    """An infer request's fields as the dicts `oip` checks (JSON's shape), without data."""
    fields: dict[str, Any] = {
        "parameters": _parameters(request.parameters),
        "inputs": [
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "parameters": _parameters(tensor.parameters),
            }
            for tensor in request.inputs
        ],
    }
    if request.id:
        fields["id"] = request.id
    if request.outputs:
        fields["outputs"] = [
            {"name": output.name, "parameters": _parameters(output.parameters)}
            for output in request.outputs
        ]
    return fields


def _parameters(parameters: Any) -> dict[str, Any]:
    """A protocol parameter map as plain values (each parameter holds one of several types)."""
    return {
        name: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
        for name, value in parameters.items()
    }


def _reader(request: Any, limit: int | None) -> oip.TensorReader:
    """How `oip` reads an input's data from this request: its raw contents (the one way for
    FP16 and BF16), or its typed contents."""
    raw: Sequence[bytes] = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: "
            "give one per input, in order, or use typed contents"
        )
    if raw and any(tensor.HasField("contents") for tensor in request.inputs):
        raise BadRequest("give each input's data once: raw_input_contents or typed contents")
    position = {tensor.name: i for i, tensor in reversed(list(enumerate(request.inputs)))}

    def read(fields: dict[str, Any], spec: TensorSpec) -> np.ndarray[Any, Any]:
        # KServe's client names the raw entry's size, as over HTTP; anything else is refused.
        size = oip.supported(fields, oip.INPUT_PARAMETERS, f"input {spec.name!r}").get(
            "binary_data_size"
        )
        index = position[fields["name"]]
        declared, shape = fields["datatype"], fields["shape"]
        if raw:
            if size is not None and size != len(raw[index]):
                raise BadRequest(
                    f"input {spec.name!r}: binary_data_size {size!r} is not the "
                    f"{len(raw[index])} bytes of its raw contents"
                )
            return oip.input_array(spec, declared, shape, limit, raw=raw[index])
        if size is not None:
            raise BadRequest(f"input {spec.name!r}: binary_data_size without raw contents")
        typed = _CONTENTS.get(declared)
        if typed is None and declared == oip.datatype(spec):
            raise BadRequest(f"input {spec.name!r}: {declared} travels in raw_input_contents only")
        values: Any = []
        if typed is not None:
            # fromiter: half the time of a list first (70 ms for a million floats, on the loop).
            field = getattr(request.inputs[index].contents, typed[0])
            values = np.fromiter(field, dtype=typed[1], count=len(field))
        return oip.input_array(spec, declared, shape, limit, values=values)

    return read
