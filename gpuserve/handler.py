"""The user contract: how validated instances become one forward pass and come back apart.

The hooks run in the order data flows, all in the batcher's worker thread:
`collate(instances) -> batch`, `forward(batch) -> output`, `split(output) -> rows`,
`postprocess(row) -> JSON-able`. The defaults cover a plain tensor-in, tensor-out model.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
import torch

from gpuserve.device import DeviceInfo
from gpuserve.errors import ModelLoadError
from gpuserve.spec import ModelSpec

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


Precision = Literal["fp32", "fp16", "bf16"]
_AUTOCAST: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Handler:
    """Runs batches of validated instances (numpy arrays shaped as `spec.input`) on a module."""

    def __init__(
        self,
        module: torch.nn.Module,
        spec: ModelSpec,
        device: DeviceInfo,
        precision: Precision = "fp32",
    ) -> None:
        self.module = module
        self.spec = spec
        self.device = torch.device(device.device)
        self.precision = precision
        self._input_dtype = _TORCH_DTYPES[spec.input.dtype]
        # Pinned host memory lets the copy to the GPU run without blocking the worker thread.
        self._pin = self.device.type == "cuda"
        # Autocast rather than a converted copy: the module keeps its fp32 weights, so the
        # fp32 reference at load time and the served path are the same module.
        self._autocast = _AUTOCAST.get(precision)
        # Set by the loader when it has measured a batch size past which throughput falls.
        self.preferred_batch_size: int | None = None

    def __call__(self, instances: list[np.ndarray[Any, Any]]) -> list[Any]:
        """The batch function the batcher calls: one forward pass for all instances."""
        with torch.inference_mode():
            output = self.forward(self.collate(instances))
            return [self.postprocess(row) for row in self.split(output)]

    def collate(self, instances: list[np.ndarray[Any, Any]]) -> torch.Tensor:
        """Stack instances into one batch on the model's device."""
        batch = torch.from_numpy(np.stack(instances))
        if self._pin:
            batch = batch.pin_memory()
        return batch.to(self.device, dtype=self._input_dtype, non_blocking=self._pin)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Run the model, in the configured precision. Override for several input tensors."""
        if self._autocast is None:
            output: torch.Tensor = self.module(batch)
            return output
        with torch.autocast(device_type=self.device.type, dtype=self._autocast):
            output = self.module(batch)
        return output

    def split(self, output: torch.Tensor) -> list[Any]:
        """Bring the whole batch back to the host once, then cut it into rows."""
        output = output.float()
        if self.spec.labels is not None:
            output = torch.softmax(output, dim=-1)
        rows: list[Any] = output.cpu().tolist()
        return rows

    def postprocess(self, row: Any) -> Any:
        """Shape one row for the JSON response: label and probabilities for a classifier."""
        if self.spec.labels is None:
            return row
        best = max(range(len(row)), key=row.__getitem__)
        return {"label": self.spec.labels[best], "probabilities": row}

    def is_oom(self, exc: BaseException) -> bool:
        """Whether `exc` means the device ran out of memory (the batcher then splits batches)."""
        return isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError))

    def check_precision(self, tolerance: float) -> float:
        """Compare the configured precision's output with fp32 on sample inputs.

        Returns the largest difference relative to the fp32 output's largest magnitude, and
        raises ModelLoadError if it is above `tolerance`.
        """
        if self._autocast is None:
            return 0.0
        rng = np.random.default_rng(0)
        batch = self.collate([self.spec.input.sample(rng) for _ in range(8)])
        with torch.inference_mode():
            reference = self.module(batch).float()
            reduced = self.forward(batch).float()
        scale = float(reference.abs().max()) or 1.0
        error = float((reduced - reference).abs().max()) / scale
        if not error <= tolerance:  # also catches NaN
            raise ModelLoadError(
                f"{self.precision} output differs from fp32 by {error:.4f} of its scale, "
                f"more than the tolerance {tolerance}: use fp32 or raise precision_tolerance"
            )
        return error

    def measure_batch_sizes(
        self, batch_sizes: tuple[int, ...], rounds: int = 3
    ) -> dict[int, float]:
        """Instances per second of the whole batch path at each size (best of `rounds`)."""
        example = self.spec.input.example()
        rates = {}
        for size in batch_sizes:
            batch = [example] * size
            best = min(_timed(self, batch) for _ in range(rounds))
            rates[size] = size / max(best, 1e-9)
        return rates

    def warm_up(self, batch_sizes: tuple[int, ...] = (2,)) -> None:
        """Run batches end to end and check the output's shape against the spec.

        Catches a spec that does not match the model before the server reports ready, and
        runs each batch size the server will use once, so none pays first-call costs later.
        """
        example = self.spec.input.example()
        try:
            with torch.inference_mode():
                output = self.forward(self.collate([example, example]))
        except Exception as exc:
            raise ModelLoadError(
                f"warm-up batch failed: does the input spec {self.spec.input.describe()} match "
                f"the model? {type(exc).__name__}: {exc}"
            ) from exc
        want = self.spec.output.shape
        got = tuple(output.shape[1:])
        if len(got) != len(want) or any(w not in (-1, g) for g, w in zip(got, want, strict=True)):
            raise ModelLoadError(
                f"warm-up output shape {list(got)} does not match the spec's output "
                f"{self.spec.output.describe()}"
            )
        # The full path, postprocess included, at each size as the batcher will send it.
        for size in batch_sizes:
            self([example] * size)


def choose_batch_size(rates: dict[int, float], tolerance: float = 0.05) -> int:
    """The smallest batch size whose throughput is within `tolerance` of the best.

    On a GPU throughput usually grows with the batch, and this is the largest size; on a CPU
    it often peaks early (cache), and larger batches would cost throughput and latency both.
    """
    best = max(rates.values())
    return min(size for size, rate in rates.items() if rate >= best * (1 - tolerance))


def _timed(handler: Handler, batch: list[np.ndarray[Any, Any]]) -> float:
    started = time.perf_counter()
    handler(batch)
    return time.perf_counter() - started
