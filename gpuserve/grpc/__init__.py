"""The gRPC transport: the Open Inference Protocol's service and gRPC's health service,
taken by grpcio's threaded server and run on the event loop (`bridge`), each call a thin
adapter onto the core's request path."""
