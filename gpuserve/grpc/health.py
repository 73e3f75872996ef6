"""gRPC's standard health service, `grpc.health.v1.Health`, beside the inference service:
what Kubernetes' gRPC probes, grpc-health-probe and service meshes ask.

The service name "" and "inference.GRPCInferenceService" stand for the server: SERVING when
it is ready (the same answer as `/health/ready`), NOT_SERVING while it loads, after every
model failed, and from the moment it starts draining; a model's name stands for that model.
Any other name is NOT_FOUND, as the protocol says. `Watch` sends the status, then each
change of it, and ends once the server drains (having said NOT_SERVING), so that no open
stream holds the exit. No API key is needed, as for `/health/*`.

The two messages are built from their descriptor at import (a private pool: nothing clashes
with grpcio-health-checking's generated module, whose protobuf pin gpuserve cannot take).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from gpuserve.core.envelope import CallRecord
from gpuserve.core.errors import ModelNotFound
from gpuserve.core.registry import ModelRegistry
from gpuserve.grpc.bridge import LoopCalls, LoopContext
from gpuserve.grpc.calls import GrpcCalls

SERVICE = "grpc.health.v1.Health"
SERVING, NOT_SERVING, SERVICE_UNKNOWN = 1, 2, 3
_WATCH_INTERVAL_S = 1.0  # how often Watch looks for a change


def _messages() -> tuple[Any, Any]:
    """HealthCheckRequest and HealthCheckResponse, as health.proto defines them."""
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="grpc/health/v1/health.proto")
    proto.package = "grpc.health.v1"
    proto.syntax = "proto3"
    request = proto.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    response = proto.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=field.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=field.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    request_class, response_class = (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{proto.package}.{name}"))
        for name in ("HealthCheckRequest", "HealthCheckResponse")
    )
    return request_class, response_class


HealthCheckRequest, HealthCheckResponse = _messages()


def status_of(models: ModelRegistry, service: str) -> int:
    """The serving status of `service`: the server, or one model; ModelNotFound otherwise."""
    if service in ("", "inference.GRPCInferenceService"):
        return SERVING if models.status == "ready" else NOT_SERVING
    found = models.find(service)
    if found is None:
        if service not in models.names:
            models.get(service)  # ModelNotFound, naming the models there are
        return NOT_SERVING  # a known model, unloaded
    ready = found.state == "ready" and models.status != "stopping"
    return SERVING if ready else NOT_SERVING


def health_handler(
    loop_calls: LoopCalls, calls: GrpcCalls, models: ModelRegistry
) -> grpc.GenericRpcHandler:
    """The health service's handler, for `server.add_generic_rpc_handlers`. Its calls go
    through `calls`, so they get a request id, metrics and an access log line."""

    async def check(request: Any, context: LoopContext) -> Any:
        def answer(_: CallRecord) -> Any:
            return HealthCheckResponse(status=status_of(models, request.service))

        return await calls.call(SERVICE, "Check", context, answer)

    async def watch(request: Any, context: LoopContext) -> AsyncIterator[Any]:
        last = None
        while True:
            try:
                status = status_of(models, request.service)
            except ModelNotFound:
                status = SERVICE_UNKNOWN  # Watch keeps the stream open, as the protocol says
            if status != last:
                last = status
                yield HealthCheckResponse(status=status)
            if models.status == "stopping":
                # Draining: the watcher has been told, and an open stream would hold the
                # server's exit until the drain times out.
                return
            await asyncio.sleep(_WATCH_INTERVAL_S)

    return loop_calls.service(
        SERVICE,
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                check,
                request_deserializer=HealthCheckRequest.FromString,
                response_serializer=HealthCheckResponse.SerializeToString,
            ),
            "Watch": grpc.unary_stream_rpc_method_handler(
                watch,
                request_deserializer=HealthCheckRequest.FromString,
                response_serializer=HealthCheckResponse.SerializeToString,
            ),
        },
    )
