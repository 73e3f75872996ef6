"""The gRPC transport: the Open Inference Protocol's service and gRPC's health service on
grpc.aio, each call a thin adapter onto the core's request path."""
