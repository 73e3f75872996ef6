"""A bare grpcio server whose ModelInfer answers a canned response, for `bench.py
--protocols`: what grpcio costs a call on its own, the floor under gpuserve's gRPC row.

    python scripts/_bare_grpc.py PORT [--asyncio]

By default grpcio's threaded server with as many threads as gpuserve's (`grpc_threads`), the
server gpuserve uses; with --asyncio, grpcio's asyncio server, for comparison.
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb

from gpuserve.config import Settings

SERVICE = "inference.GRPCInferenceService"
ANSWER = pb.ModelInferResponse(
    model_name="digits",
    model_version="1",
    outputs=[
        pb.ModelInferResponse.InferOutputTensor(name="logits", datatype="FP32", shape=[1, 10])
    ],
    raw_output_contents=[bytes(40)],
).SerializeToString()


def handlers(infer: Any) -> tuple[grpc.GenericRpcHandler]:
    handler = grpc.unary_unary_rpc_method_handler(infer)  # bytes in, bytes out
    return (grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": handler}),)


def serve_threaded(port: int) -> None:
    threads = Settings.model_fields["grpc_threads"].default
    server = grpc.server(ThreadPoolExecutor(threads))
    server.add_generic_rpc_handlers(handlers(lambda request, context: ANSWER))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


async def serve_asyncio(port: int) -> None:
    async def infer(request: bytes, context: Any) -> bytes:
        return ANSWER

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(handlers(infer))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    if "--asyncio" in sys.argv[2:]:
        asyncio.run(serve_asyncio(int(sys.argv[1])))
    else:
        serve_threaded(int(sys.argv[1]))
