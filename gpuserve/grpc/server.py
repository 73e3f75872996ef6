"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService`, as Triton and
KServe serve it, so their gRPC clients work as they are.

A thin transport like the HTTP routes: each call is a few lines onto the core, inside the
envelope every call gets (`calls.GrpcCalls`: request id, API key, status, metrics, access
log). Inference takes the core's one request path with the gRPC codec (`codec`); metadata,
configuration, statistics and the repository read what HTTP's v2 routes read
(`protocols.oip_reads`). It runs on the server's event loop (grpc.aio) on its own port.

The service comes from tritonclient's generated modules, compiled by Triton from its own
grpc_service.proto, the protocol's reference: nothing generated is kept in this repository.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gpuserve.config import Settings
from gpuserve.core import repository
from gpuserve.core.calls import Call, Received, RequestPath
from gpuserve.core.envelope import CallRecord, Envelope
from gpuserve.core.errors import InvalidInput, ModelNotFound, NotServed
from gpuserve.core.metrics import Metrics
from gpuserve.core.offload import BodyDecoder
from gpuserve.core.registry import ModelRegistry
from gpuserve.grpc.calls import GrpcCalls, status_of
from gpuserve.grpc.codec import decode_infer, encode_infer, read_infer_request
from gpuserve.grpc.health import health_handler
from gpuserve.protocols import oip
from gpuserve.protocols import oip_reads as reads

SERVICE = "inference.GRPCInferenceService"
__all__ = ["SERVICE", "GrpcServer", "InferenceService", "status_of"]


_MAX_PENDING = 1 << 20


class GrpcServer:
    """The gRPC endpoint: started beside uvicorn on the same loop, stopped with it.

    Messages are bounded like HTTP bodies, by `max_body_bytes`; connections like HTTP's, by
    `max_connections` (gRPC's own count: a connection past it is closed at once), the
    HTTP/2 handshake by `header_timeout_s` and an idle connection by `keep_alive_s`. With
    `share_port` (worker
    processes side by side) it listens with SO_REUSEPORT, and the kernel spreads the
    connections over the workers.
    """

    def __init__(
        self,
        settings: Settings,
        models: ModelRegistry,
        metrics: Metrics,
        *,
        path: RequestPath | None = None,
        share_port: bool = False,
        max_connections: int | None = None,
    ) -> None:
        self.settings = settings
        options = [
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            # gRPC shares a port by default (SO_REUSEPORT), so a second server on a port
            # already in use would start and get half the calls: fail instead, unless the
            # sharing is meant.
            ("grpc.so_reuseport", 1 if share_port else 0),
            ("grpc.max_allowed_incoming_connections", max_connections or settings.max_connections),
            ("grpc.server_handshake_timeout_ms", int(settings.header_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", int(settings.keep_alive_s * 1000)),
            # Calls that arrived while the event loop was busy wait in gRPC's core for it to
            # take them; past its default of 1000 the core cancels the rest (CANCELLED, no
            # trace in gpuserve). Every call reaches gpuserve instead, whose model queue
            # answers what it cannot take with RESOURCE_EXHAUSTED, counted and logged. (A
            # limit on a connection's concurrent streams is not set: gRPC's core refuses a
            # burst past it with REFUSED_STREAM, which clients see as UNAVAILABLE.)
            ("grpc.server.max_pending_requests", _MAX_PENDING),
            ("grpc.server.max_pending_requests_hard_limit", _MAX_PENDING),
        ]
        self._server = grpc.aio.server(options=options)
        envelope = Envelope(metrics, settings.api_key_values(), settings.access_log, "grpc")
        calls = GrpcCalls(envelope)
        # On its own (no HTTP app beside it), messages are decoded where they arrive.
        path = path or RequestPath(models, BodyDecoder(settings.parse_offload_bytes, 0))
        inference = InferenceService(settings, path, calls)
        _register(self._server, inference)
        self._server.add_generic_rpc_handlers((health_handler(calls, models),))
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
    """The protocol's calls. Those gpuserve does not serve (shared memory, trace and log
    settings, streaming) answer UNIMPLEMENTED saying so (`oip.NOT_SERVED_CALLS`), in the
    envelope every call gets: no traceback in the log."""

    def __init__(self, settings: Settings, path: RequestPath, calls: GrpcCalls) -> None:
        self._settings = settings
        self._path = path
        self._models = path.models
        self._calls = calls

    async def _call(self, method: str, context: Any, work: Any) -> Any:
        return await self._calls.call(SERVICE, method, context, work)

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("ServerLive", context, lambda _: pb.ServerLiveResponse(live=True))

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def ready(_: CallRecord) -> Any:
            return pb.ServerReadyResponse(ready=reads.server_ready(self._models))

        return await self._call("ServerReady", context, ready)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def ready(record: CallRecord) -> Any:
            name, version = _model(request.name, request.version, record)
            return pb.ModelReadyResponse(ready=reads.model_ready(self._models, name, version))

        return await self._call("ModelReady", context, ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def metadata(_: CallRecord) -> Any:
            body = reads.server_metadata(self._settings)
            return json_format.ParseDict(body, pb.ServerMetadataResponse())

        return await self._call("ServerMetadata", context, metadata)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def metadata(record: CallRecord) -> Any:
            name, version = _model(request.name, request.version, record)
            body = reads.metadata_of(self._models, name, version)
            return json_format.ParseDict(body, pb.ModelMetadataResponse())

        return await self._call("ModelMetadata", context, metadata)

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def config(record: CallRecord) -> Any:
            name, version = _model(request.name, request.version, record)
            config = reads.model_config_of(self._models, name, version)
            return json_format.ParseDict({"config": config}, pb.ModelConfigResponse())

        return await self._call("ModelConfig", context, config)

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def statistics(record: CallRecord) -> Any:
            name, version = _model(request.name, request.version, record)
            stats = reads.statistics_of(self._models, name or None, version)
            return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

        return await self._call("ModelStatistics", context, statistics)

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        def index(_: CallRecord) -> Any:
            self._repository_on()
            on_disk = repository.on_disk(self._settings.repository_dir)
            entries = reads.index_entries(self._models, on_disk, ready=request.ready)
            return json_format.ParseDict({"models": entries}, pb.RepositoryIndexResponse())

        return await self._call("RepositoryIndex", context, index)

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def load(record: CallRecord) -> Any:
            self._repository_on()
            record.model = (request.model_name, "")
            if request.parameters:
                names = ", ".join(sorted(request.parameters))
                raise InvalidInput(f"load parameters are not supported: {names}")
            await repository.load_model(self._models, self._settings, request.model_name)
            return pb.RepositoryModelLoadResponse()

        return await self._call("RepositoryModelLoad", context, load)

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def unload(record: CallRecord) -> Any:
            self._repository_on()
            record.model = (request.model_name, "")
            await self._models.unload(request.model_name, self._settings.shutdown_timeout_s)
            return pb.RepositoryModelUnloadResponse()

        return await self._call("RepositoryModelUnload", context, unload)

    async def ModelInfer(self, message: bytes, context: grpc.aio.ServicerContext) -> Any:
        """Takes the message as bytes (see `_register`), so that one that cannot be
        read is this call's INVALID_ARGUMENT, counted and logged, and a large one goes to
        the parse process as it came."""

        async def infer(record: CallRecord) -> Any:
            request = read_infer_request(message)
            call = Call(request.model_name, request.model_version or None, postprocess=False)

            async def receive() -> Received[Any]:
                # The client's deadline, if it set one, and the message's size: a large one
                # is decoded in a parse process, as a large HTTP body is, and goes there as
                # bytes (the generated message classes cannot be pickled).
                size = len(message)
                payload = message if self._path.offload.offloads(size) else request
                return Received(payload, context.time_remaining(), size)

            answer = await self._path.infer(call, record, receive, decode_infer)
            decoded = answer.decoded
            response_id = decoded.id if decoded.id is not None else record.request_id
            version = answer.service.version
            return encode_infer(answer.spec, version, answer.rows, decoded, response_id)

        return await self._call("ModelInfer", context, infer)

    def _repository_on(self) -> None:
        if not self._settings.repository_api:
            raise ModelNotFound("the repository API is off (set repository_api to turn it on)")


def _not_served(method: str, what: str) -> Any:
    async def refuse(self: InferenceService, request: Any, context: Any) -> Any:
        def fail(_: CallRecord) -> Any:
            raise NotServed(f"{method}: {what} is not served by gpuserve")

        return await self._call(method, context, fail)

    refuse.__name__ = method
    return refuse


for _method, _what in oip.NOT_SERVED_CALLS.items():
    setattr(InferenceService, _method, _not_served(_method, _what))


class _Handlers:
    """Stands in for the server to collect the generated registration's handlers."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []
        self.registered: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.registered.update(handlers)


def _register(server: grpc.aio.Server, inference: InferenceService) -> None:
    """The service's handlers, but for ModelInfer's, which leaves its message as bytes.

    The generated one reads every message on the event loop and answers one that it cannot
    read UNKNOWN, before gpuserve sees the call; `InferenceService.ModelInfer` reads it itself.
    """
    found = _Handlers()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, found)
    infer = grpc.unary_unary_rpc_method_handler(
        inference.ModelInfer, response_serializer=pb.ModelInferResponse.SerializeToString
    )
    mine = {"ModelInfer": infer}
    # Registered handlers win over generic ones; generic ones are asked in order.
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, mine), *found.generic)
    )
    if found.registered:
        server.add_registered_method_handlers(SERVICE, {**found.registered, **mine})


def _model(name: str, version: str, record: CallRecord) -> tuple[str, str | None]:
    """A request's model name and version (None: not given), noted for the access log."""
    if name:
        record.model = (name, version)
    return name, version or None
