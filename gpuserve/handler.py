"""The user contract: the hooks that turn requests into forward passes and back.

The hooks, in the order data flows:

- `load(device)`: build the model (default: the configured file or factory). Load thread.
- `preprocess(instance)`: one validated instance to what `collate` takes. Event loop.
- `collate(items) -> batch`: stack; for inputs with a variable dimension, pad to the longest
  (or to the length bucket) and pass a mask. Worker thread, as are the next two.
- `forward(batch) -> output`: the model.
- `split(output) -> rows`: one host copy for the whole batch, then one row per instance.
- `postprocess(row) -> JSON-able`: one row for the `/predict` response. Event loop.

The defaults cover a plain tensor-in, tensor-out model, so most users write no handler. A
model that needs its own code subclasses `Handler`, overrides the hooks it needs, and is named
in the model's config as `handler = "package.module:Class"`.

What the hooks need not do is the runner's (`gpuserve.model.runner`), whichever hooks are
overridden: a batch `collate` leaves on the host goes to the device through pinned memory on a
copy stream, overlapping the running forward pass; `forward` runs under the configured
precision (autocast, or inputs cast to weights cast at load) and compile; rows are checked
against the spec and for NaN.
"""

from __future__ import annotations

import bisect
from typing import Any, NamedTuple

import numpy as np
import torch

from gpuserve.config import ModelSettings
from gpuserve.model.device import DeviceInfo
from gpuserve.model.sources import load_module
from gpuserve.spec import ModelSpec, TensorSpec

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


class Padded(NamedTuple):
    """A batch of variable-length instances, padded to one shape.

    `mask` is True at real positions and False at padding, over the variable dimensions
    (a batch of token sequences: `values` [B, L], `mask` [B, L]). `lengths` holds each
    instance's own sizes of those dimensions.
    """

    values: torch.Tensor
    mask: torch.Tensor
    lengths: list[tuple[int, ...]]


# How cuBLAS and cuDNN word a failed allocation.
_OOM_SIGNS = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDA out of memory")
# CUDA errors that corrupt the context: nothing on the device works after them.
_FATAL_SIGNS = (
    "illegal memory access",
    "device-side assert triggered",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "uncorrectable ECC error",
    "CUDA error: the launch timed out",
)


class Handler:
    """A model's hooks, for batches of validated instances: numpy arrays shaped as the spec's
    input, or for a model of several inputs, dicts of them by name.

    `module` may be given directly (tests, embedding); otherwise the runner calls `load`.
    Subclasses may read `spec`, `settings`, `device` and `module`, and, for a model with a
    variable-length input, `bucket_input` (the input that decides length buckets),
    `variable_axes` (its `-1` dimensions) and `length_buckets` (None without buckets).
    """

    def __init__(
        self,
        spec: ModelSpec,
        device: DeviceInfo,
        settings: ModelSettings | None = None,
        module: Any = None,
    ) -> None:
        self.spec = spec
        # Embedded without settings: the batching defaults, for a model named as its spec.
        self.settings = settings or ModelSettings.model_construct(name=spec.name)
        self.device = torch.device(device.device)
        self.module = module
        # None for strings: what their preprocess makes (token ids, say) keeps its own dtype.
        self._input_dtype = _TORCH_DTYPES.get(spec.input.dtype) if spec.input else None
        # Pinned host memory lets the copy to the GPU run without blocking the worker thread.
        self._pin = self.device.type == "cuda"
        # Several inputs: each is stacked, or padded on its own; the first variable one
        # decides the length bucket.
        self.bucket_input = next((t for t in spec.input_specs if t.variable), None)
        self.variable_axes = (
            [i for i, dim in enumerate(self.bucket_input.shape) if dim == -1]
            if self.bucket_input is not None
            else []
        )
        self.length_buckets = self.settings.length_buckets if self.variable_axes else None

    # The hooks, in the order data flows.

    def load(self, device: torch.device) -> Any:
        """Build the model on `device`. Default: the configured file, or factory and weights."""
        return load_module(self.settings, device)

    def preprocess(self, instance: Any) -> Any:
        """One instance, already checked against the spec, to what `collate` takes: an array
        (a str for a string input), or, for a model of several inputs, a dict of them by name.

        Runs on the event loop for each instance before it is queued, so keep it cheap; raise
        `gpuserve.core.errors.InvalidInput` to answer 4xx without touching the model.
        """
        return instance

    def collate(self, items: list[Any]) -> Any:
        """Stack items into one batch; pad variable-length ones.

        A batch (tensors, or a Padded, tuple, list or dict of them) may be left on the host:
        the runner copies it to the device through pinned memory, without blocking. The
        default stacks straight into pinned memory and starts that copy itself.

        For a model of several inputs, a tuple of one tensor per input, in the spec's order:
        each stacked, or padded with its `pad_value` to its longest (no mask: a model that
        needs one takes it as an input)."""
        if self.spec.input is None:
            return tuple(
                self._collate_input(t, [item[t.name] for item in items])
                for t in self.spec.input_specs
            )
        if self.variable_axes:
            return self._pad(items)
        return self._stacked(items, self._input_dtype)

    def _collate_input(self, spec: TensorSpec, items: list[np.ndarray[Any, Any]]) -> torch.Tensor:
        """One input of a model of several: stacked, or padded to the longest (and up to its
        length bucket, for the input that decides buckets)."""
        dtype = _TORCH_DTYPES.get(spec.dtype)
        if not spec.variable:
            return self._stacked(items, dtype)
        shape = self._padded_shape(items, bucketed=spec is self.bucket_input)
        host = self._host_buffer((len(items), *shape), items[0].dtype)
        values = host.numpy()
        values.fill(spec.pad_value)
        for i, item in enumerate(items):
            values[i][_prefix(item.shape)] = item
        return self._to_device(host, dtype or host.dtype)

    def forward(self, batch: Any) -> Any:
        """Run the model on a batch: a Padded batch passes (values, mask), or (values) alone
        when the input says `"mask": false`, and a tuple (several inputs) its tensors, in
        order. The runner calls it under the configured precision."""
        return call_module(self.module, batch, self.spec)

    def split(self, output: Any) -> list[Any]:
        """Bring the whole batch back to the host once, then cut it into rows.

        The rows are the model's own values as numpy arrays (floating outputs as float32,
        integer and boolean ones in their own dtype): /v2 returns them as they are, and
        `postprocess` turns them into what /predict answers.
        """
        if self.spec.output is None:  # several outputs: each instance's row of each, by name
            columns = {
                t.name: list(_host_array(value))
                for t, value in zip(
                    self.spec.output_specs, _by_spec(output, self.spec), strict=True
                )
            }
            return [
                dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)
            ]
        return list(_host_array(output))

    def postprocess(self, row: Any) -> Any:
        """Shape one row for the /predict response: for a classifier, the label with the
        probabilities (softmax of logits, or the model's own), or with the model's scores."""
        labels = self.spec.labels
        if labels is None:
            return row
        kind = self.spec.output_kind
        values = softmax(row) if kind == "logits" else row
        key = "scores" if kind == "scores" else "probabilities"
        return {"label": labels[int(np.argmax(values))], key: values}

    def bucket(self, item: Any) -> int | None:
        """The length bucket of an item: batches only mix items of one bucket."""
        if not self.length_buckets:
            return None
        if self.spec.input is None:
            assert self.bucket_input is not None
            item = item[self.bucket_input.name]
        return bisect.bisect_left(self.length_buckets, int(np.shape(item)[self.variable_axes[0]]))

    def is_oom(self, exc: BaseException) -> bool:
        """Whether `exc` means the device ran out of memory (the batcher then splits batches).

        cuBLAS and cuDNN report a failed allocation of their workspace as a RuntimeError of
        their own, not as torch's OutOfMemoryError.
        """
        if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
            return True
        return isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in _OOM_SIGNS)

    def is_fatal(self, exc: BaseException) -> bool:
        """Whether `exc` leaves the device unusable: a sticky CUDA error, after which every
        later call in this process fails too. The batcher then takes this copy out of service,
        and readiness reports the model failed once no copy is left."""
        return isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in _FATAL_SIGNS)

    def _host_buffer(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> torch.Tensor:
        """Host memory for a batch, pinned when it goes to a GPU, so the copy runs without
        blocking the thread. torch caches pinned blocks, so this is no allocation per batch."""
        return torch.empty(shape, dtype=_torch_dtype(dtype), pin_memory=self._pin)

    def _to_device(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return tensor.to(self.device, dtype=dtype, non_blocking=self._pin)

    def _stacked(
        self, items: list[np.ndarray[Any, Any]], dtype: torch.dtype | None
    ) -> torch.Tensor:
        """Items of one shape as one batch on the device, in `dtype` (or their own)."""
        first = items[0]
        host = self._host_buffer((len(items), *first.shape), first.dtype)
        np.stack(items, out=host.numpy())  # straight into (pinned) host memory: one copy
        return self._to_device(host, dtype or host.dtype)

    def _padded_shape(self, items: list[np.ndarray[Any, Any]], bucketed: bool) -> list[int]:
        """The longest item's shape; when `bucketed`, its bucketed dimension up to its
        length bucket."""
        shape = list(np.max([item.shape for item in items], axis=0))
        if bucketed and self.length_buckets:
            axis = self.variable_axes[0]
            index = bisect.bisect_left(self.length_buckets, shape[axis])
            if index < len(self.length_buckets):  # past the last bound: the longest item decides
                shape[axis] = self.length_buckets[index]
        return shape

    def _pad(self, items: list[np.ndarray[Any, Any]]) -> Padded:
        """Pad each variable dimension to the longest item, or up to its length bucket."""
        shape = self._padded_shape(items, bucketed=True)
        spec = self.bucket_input
        assert spec is not None
        values_host = self._host_buffer((len(items), *shape), spec.numpy_dtype)
        values = values_host.numpy()
        values.fill(spec.pad_value)
        mask_shape = [shape[axis] for axis in self.variable_axes]
        mask_host = self._host_buffer((len(items), *mask_shape), np.dtype(bool))
        mask = mask_host.numpy()
        mask.fill(False)
        lengths = []
        for i, item in enumerate(items):
            values[i][_prefix(item.shape)] = item
            own = tuple(item.shape[axis] for axis in self.variable_axes)
            mask[i][_prefix(own)] = True
            lengths.append(own)
        return Padded(
            self._to_device(values_host, self._input_dtype or values_host.dtype),
            self._to_device(mask_host, torch.bool),
            lengths,
        )


def call_module(module: Any, batch: Any, spec: ModelSpec) -> Any:
    """Call `module` on a collated batch, as `Handler.forward` does by default."""
    assert module is not None, "the model is not loaded"
    if isinstance(batch, Padded):
        if spec.input is not None and not spec.input.mask:
            return module(batch.values)
        return module(batch.values, batch.mask)
    if isinstance(batch, tuple):
        return module(*batch)
    return module(batch)


def _host_array(value: torch.Tensor) -> np.ndarray[Any, Any]:
    """An output on the host: floating point as float32 (numpy has no bfloat16), integers
    and booleans as they are (an id past 2**24 survives). A copy: the rows outlive this
    batch, and a CPU output may be a view of the model's."""
    if value.is_floating_point():
        value = value.float()
    return value.cpu().numpy().copy()


def _by_spec(output: Any, spec: ModelSpec) -> list[Any]:
    """Several outputs in the spec's order: a dict read by name, a tuple as it comes."""
    if isinstance(output, dict):
        return [output[t.name] for t in spec.output_specs]
    return list(output)


def softmax(row: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Probabilities from one row of logits (last axis), in the row's own precision."""
    shifted = np.exp(row - row.max(axis=-1, keepdims=True))
    result: np.ndarray[Any, Any] = shifted / shifted.sum(axis=-1, keepdims=True)
    return result


def _torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def _prefix(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)
