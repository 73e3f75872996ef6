"""The protocol-neutral core: one request path for every protocol, the model registry and
services, the batcher, deadlines, metrics and the errors. Nothing here knows HTTP or gRPC."""
