"""LitServe with its dynamic batching, written the way its documentation shows.

python scripts/bench_servers/litserve_server.py --model light.pt2 --port 8002 --timeout 0.005
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation at run
# time to build its endpoint, and a string there turns the body into a query parameter.

import argparse
from typing import Any

import litserve as ls
import torch


class API(ls.LitAPI):
    def __init__(self, model_path: str, integer_inputs: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_path = model_path
        self.dtype = torch.int64 if integer_inputs else torch.float32

    def setup(self, device: str) -> None:
        self.model = torch.export.load(self.model_path).module()

    def decode_request(self, request: dict[str, Any]) -> torch.Tensor:
        return torch.tensor(request["inputs"], dtype=self.dtype)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)

    def encode_response(self, output: torch.Tensor) -> dict[str, Any]:
        return {"outputs": output.tolist()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=0.005)
    parser.add_argument("--integer-inputs", action="store_true")
    args = parser.parse_args()
    api = API(args.model, args.integer_inputs, max_batch_size=32, batch_timeout=args.timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(port=args.port, log_level="warning", generate_client_file=False)
