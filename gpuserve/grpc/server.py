"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService`, as Triton and
KServe serve it, so their gRPC clients work as they are.

A thin transport like the HTTP routes: each call is a few lines onto the core, inside the
envelope every call gets (`calls.GrpcCalls`: request id, API key, status, metrics, access
log). Inference takes the core's one request path with the gRPC codec (`codec`); metadata,
configuration, statistics and the repository read what HTTP's v2 routes read
(`protocols.oip_reads`). Its calls' work runs on the server's event loop, as HTTP's does;
grpcio's threaded server takes them on a port of its own (`bridge`).

The service comes from tritonclient's generated modules, compiled by Triton from its own
grpc_service.proto, the protocol's reference: nothing generated is kept in this repository.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
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
from gpuserve.grpc.bridge import LoopCalls, LoopContext
from gpuserve.grpc.calls import GrpcCalls, status_of
from gpuserve.grpc.codec import decode_infer, encode_infer, read_infer_request
from gpuserve.grpc.health import health_handler
from gpuserve.protocols import oip
from gpuserve.protocols import oip_reads as reads

SERVICE = "inference.GRPCInferenceService"
__all__ = ["SERVICE", "GrpcServer", "InferenceService", "status_of"]


_MAX_PENDING = 1 << 20


class GrpcServer:
    """The gRPC endpoint: started beside uvicorn, its calls' work on the same loop, stopped
    with it. grpcio's threaded server takes the calls (`bridge`: each waits in a thread of
    `grpc_threads` while its work runs on the loop).

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
            # Calls that arrive faster than the server takes them wait in gRPC's core; past
            # its default of 1000 the core cancels the rest (CANCELLED, no
            # trace in gpuserve). Every call reaches gpuserve instead, whose model queue
            # answers what it cannot take with RESOURCE_EXHAUSTED, counted and logged. (A
            # limit on a connection's concurrent streams is not set: gRPC's core refuses a
            # burst past it with REFUSED_STREAM, which clients see as UNAVAILABLE.)
            ("grpc.server.max_pending_requests", _MAX_PENDING),
            ("grpc.server.max_pending_requests_hard_limit", _MAX_PENDING),
        ]
        self._options = options
        self._server: grpc.Server | None = None
        self._threads: ThreadPoolExecutor | None = None
        envelope = Envelope(metrics, settings.api_key_values(), settings.access_log, "grpc")
        self._calls = GrpcCalls(envelope)
        self._models = models
        # On its own (no HTTP app beside it), messages are decoded where they arrive.
        path = path or RequestPath(models, BodyDecoder(settings.parse_offload_bytes, 0))
        self._inference = InferenceService(settings, path, self._calls)
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen on `host:port` (0: a port the OS picks) and serve; returns the port."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        threads = ThreadPoolExecutor(self.settings.grpc_threads, thread_name_prefix="grpc-call")
        server = grpc.server(threads, options=self._options)
        loop_calls = LoopCalls(asyncio.get_running_loop())
        _register(server, loop_calls, self._inference)
        server.add_generic_rpc_handlers((health_handler(loop_calls, self._calls, self._models),))
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc says only "Failed to bind"
            threads.shutdown()
            raise OSError(f"gRPC cannot listen on {address}: {exc}") from None
        server.start()
        self._server, self._threads = server, threads
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, let those in progress finish for up to `grace_s`, then cancel
        what is left (its clients get CANCELLED)."""
        server, threads = self._server, self._threads
        if server is not None:
            # The calls' threads wait for the loop, which runs on while the stop waits.
            await asyncio.to_thread(lambda: server.stop(grace_s).wait())
        if threads is not None:
            threads.shutdown(wait=False)  # every call has ended: the idle threads go


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

    async def ServerLive(self, request: Any, context: LoopContext) -> Any:
        return await self._call("ServerLive", context, lambda _: pb.ServerLiveResponse(live=True))

    async def ServerReady(self, request: Any, context: LoopContext) -> Any:
        def ready(_: CallRecord) -> Any:
            return pb.ServerReadyResponse(ready=reads.server_ready(self._models))

        return await self._call("ServerReady", context, ready)

    async def ModelReady(self, request: Any, context: LoopContext) -> Any:
        def ready(record: CallRecord) -> Any:
            name, version = _model(request.name, request.version, record)
            return pb.ModelReadyResponse(ready=reads.model_ready(self._models, name, version))

        return await self._call("ModelReady", context, ready)

    async def ServerMetadata(self, request: Any, context: LoopContext) -> Any:
        def metadata(_: CallRecord) -> Any:
            body = reads.server_metadata(self._settings)
            return json_format.ParseDict(body, pb.ServerMetadataResponse())

        return await self._call("ServerMetadata", context, metadata)

    async def ModelMetadata(self, request: Any, context: LoopContext) -> Any:
        def metadata(record: CallRecord) -> Any:
            name, version = _model(request.name, request.version, record)
            body = reads.metadata_of(self._models, name, version)
            return json_format.ParseDict(body, pb.ModelMetadataResponse())

        return await self._call("ModelMetadata", context, metadata)

    async def ModelConfig(self, request: Any, context: LoopContext) -> Any:
        def config(record: CallRecord) -> Any:
            name, version = _model(request.name, request.version, record)
            config = reads.model_config_of(self._models, name, version)
            return json_format.ParseDict({"config": config}, pb.ModelConfigResponse())

        return await self._call("ModelConfig", context, config)

    async def ModelStatistics(self, request: Any, context: LoopContext) -> Any:
        def statistics(record: CallRecord) -> Any:
            name, version = _model(request.name, request.version, record)
            stats = reads.statistics_of(self._models, name or None, version)
            return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

        return await self._call("ModelStatistics", context, statistics)

    async def RepositoryIndex(self, request: Any, context: LoopContext) -> Any:
        def index(_: CallRecord) -> Any:
            self._repository_on()
            on_disk = repository.on_disk(self._settings.repository_dir)
            entries = reads.index_entries(self._models, on_disk, ready=request.ready)
            return json_format.ParseDict({"models": entries}, pb.RepositoryIndexResponse())

        return await self._call("RepositoryIndex", context, index)

    async def RepositoryModelLoad(self, request: Any, context: LoopContext) -> Any:
        async def load(record: CallRecord) -> Any:
            self._repository_on()
            record.model = (request.model_name, "")
            if request.parameters:
                names = ", ".join(sorted(request.parameters))
                raise InvalidInput(f"load parameters are not supported: {names}")
            await repository.load_model(self._models, self._settings, request.model_name)
            return pb.RepositoryModelLoadResponse()

        return await self._call("RepositoryModelLoad", context, load)

    async def RepositoryModelUnload(self, request: Any, context: LoopContext) -> Any:
        async def unload(record: CallRecord) -> Any:
            self._repository_on()
            record.model = (request.model_name, "")
            await self._models.unload(request.model_name, self._settings.shutdown_timeout_s)
            return pb.RepositoryModelUnloadResponse()

        return await self._call("RepositoryModelUnload", context, unload)

    async def ModelInfer(self, message: bytes, context: LoopContext) -> Any:
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
    """Stands in for the server to collect the generated registration's method handlers
    (it gives them twice: as a generic handler too, which is not needed here)."""

    def __init__(self) -> None:
        self.registered: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.registered.update(handlers)


def _register(server: grpc.Server, calls: LoopCalls, inference: InferenceService) -> None:
    """The service's handlers, run on the loop, but for ModelInfer's, which leaves its
    message as bytes.

    The generated one reads every message before gpuserve sees the call and answers one that
    it cannot read UNKNOWN; `InferenceService.ModelInfer` reads it itself.
    """
    found = _Handlers()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, found)
    handlers = dict(found.registered)
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        inference.ModelInfer, response_serializer=pb.ModelInferResponse.SerializeToString
    )
    server.add_generic_rpc_handlers((calls.service(SERVICE, handlers),))


def _model(name: str, version: str, record: CallRecord) -> tuple[str, str | None]:
    """A request's model name and version (None: not given), noted for the access log."""
    if name:
        record.model = (name, version)
    return name, version or None
