"""The baseline: a FastAPI server as a typical tutorial writes it. One forward per request.

python scripts/bench_servers/naive_server.py --model light.pt2 --port 8001
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class Request(BaseModel):
    inputs: list[float]


def build(model_path: str, integer_inputs: bool) -> FastAPI:
    model = torch.export.load(model_path).module()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(request: Request) -> dict[str, list[float]]:
        dtype = torch.int64 if integer_inputs else torch.float32
        x = torch.tensor([request.inputs], dtype=dtype)
        with torch.no_grad():
            y = model(x)
        return {"outputs": y[0].tolist()}

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--integer-inputs", action="store_true")
    args = parser.parse_args()
    app = build(args.model, args.integer_inputs)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
