"""A bare grpc.aio server whose ModelInfer answers a canned response, for `bench.py
--protocols`: what grpcio's asyncio server costs a call on its own, the floor under gpuserve's
gRPC row.

    python scripts/_bare_grpc.py PORT
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"
ANSWER = pb.ModelInferResponse(
    model_name="digits",
    model_version="1",
    outputs=[
        pb.ModelInferResponse.InferOutputTensor(name="logits", datatype="FP32", shape=[1, 10])
    ],
    raw_output_contents=[bytes(40)],
).SerializeToString()


async def infer(request: bytes, context: Any) -> bytes:
    return ANSWER


async def serve(port: int) -> None:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(infer)  # bytes in, bytes out
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
