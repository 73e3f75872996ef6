"""The user contract: the hooks that turn requests into forward passes and back.

The hooks, in the order data flows:

- `load(device)`: build the model (default: the configured file or factory). Load thread.
- `preprocess(instance)`: one validated instance to what `collate` takes. Event loop.
- `collate(items) -> batch`: stack; for inputs with a variable dimension, pad to the longest
  (or to the length bucket) and pass a mask. Worker thread, as are the next two.
- `forward(batch) -> output`: the model, in the configured precision.
- `split(output) -> rows`: one host copy for the whole batch, then one row per instance.
- `postprocess(row) -> JSON-able`: one row for the `/predict` response. Event loop.

The defaults cover a plain tensor-in, tensor-out model, so most users write no handler. A
model that needs its own code subclasses `Handler`, overrides the hooks it needs, and is named
in the model's config as `handler = "package.module:Class"`.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import copy
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from gpuserve.config import ModelSettings
from gpuserve.core.errors import InferenceError, ModelLoadError
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
_AUTOCAST: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Weights cast once at load: no per-forward re-cast of every weight, as autocast does.
_CAST_WEIGHTS: dict[str, torch.dtype] = {
    "fp16-weights": torch.float16,
    "bf16-weights": torch.bfloat16,
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


class Prepared(NamedTuple):
    """A collated batch on its way to the device; `copied` fires when the copy is done.

    `size` is the number of real items: a compiled model's batch is padded past it.
    """

    batch: Any
    copied: Any  # torch.cuda.Event on CUDA, None on the CPU
    size: int
    rows: int = -1  # the batch's rows, padding included (-1: not known)


class Launched(NamedTuple):
    """A batch whose forward pass is launched: its output (on the host once `done` fires),
    the reader of its non-finite rows, its real size, and each instance's lengths for a
    per-position output."""

    output: Any
    done: Any  # torch.cuda.Event on CUDA, None on the CPU
    read_broken: Callable[[], list[int]]
    size: int
    lengths: list[tuple[int, ...]] | None
    rows: int = -1  # the rows the output must have (-1: not known)


logger = logging.getLogger("gpuserve.model.loading")

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
    """Runs batches of validated instances on a module: numpy arrays shaped as the spec's
    input, or for a model of several inputs, dicts of them by name.

    `module` may be given directly (tests, embedding); otherwise `setup()` calls `load`.
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
        self.precision = self.settings.precision
        # None for strings: what their preprocess makes (token ids, say) keeps its own dtype.
        self._input_dtype = _TORCH_DTYPES.get(spec.input.dtype) if spec.input else None
        # Pinned host memory lets the copy to the GPU run without blocking the worker thread.
        self._pin = self.device.type == "cuda"
        # Copies to the GPU go on their own stream, to overlap the running forward pass; the
        # forward pass runs on a stream of this copy's own, so that copies of a model on one
        # GPU overlap rather than queue on the default stream.
        self._copy_stream = torch.cuda.Stream(self.device) if self._pin else None
        self._compute_stream = torch.cuda.Stream(self.device) if self._pin else None
        # Autocast rather than a converted copy: the module keeps its fp32 weights, so the
        # fp32 reference at load time and the served path are the same module.
        self._autocast = _AUTOCAST.get(self.precision)
        # Or weights cast at load; the fp32 module is kept only for the precision check.
        self._weights_dtype = _CAST_WEIGHTS.get(self.precision)
        self._reference: Any = None
        # Several inputs: each is stacked, or padded on its own; the first variable one
        # decides the length bucket.
        self._bucket_input = next((t for t in spec.input_specs if t.variable), None)
        self._variable_axes = (
            [i for i, dim in enumerate(self._bucket_input.shape) if dim == -1]
            if self._bucket_input is not None
            else []
        )
        self._buckets = self.settings.length_buckets if self._variable_axes else None
        # Set by the loader when it has measured a batch size past which throughput falls.
        self.preferred_batch_size: int | None = None
        # A compiled model sees only these batch sizes (set by setup when compiling).
        self._batch_buckets: tuple[int, ...] = ()
        self.graph_gate: GraphGate | None = None
        self._eager_module: Any = module

    def __call__(self, items: list[Any]) -> list[Any]:
        """The batch function: one forward pass for all items (`run(prepare(items))`)."""
        return self.run(self.prepare(items))

    def prepare(self, items: list[Any]) -> Prepared:
        """First stage: collate and start the copy to the device.

        The batcher calls this for the batch waiting behind the running one, in another
        thread, so on CUDA the copy of batch k+1 (pinned memory, non-blocking, on a side
        stream) overlaps the forward pass of batch k.
        """
        self.use_device()
        size = len(items)
        if self._batch_buckets:
            # Fixed batch sizes for a compiled model: fill up with copies of the last item.
            bucket = next((b for b in self._batch_buckets if b >= size), size)
            items = [*items, *[items[-1]] * (bucket - size)]
        with torch.inference_mode():
            if self._copy_stream is None:
                return Prepared(self.collate(items), None, size, len(items))
            with torch.cuda.stream(self._copy_stream):
                batch = self.collate(items)
                copied = torch.cuda.Event()
                copied.record(self._copy_stream)
            return Prepared(batch, copied, size, len(items))

    @property
    def pipelined(self) -> bool:
        """Whether the batcher may split `run` into `launch` and `complete` on two threads:
        on a GPU (unless `completion_thread` is off), where waiting for one batch's output
        would keep the next batch from being launched."""
        return self._compute_stream is not None and self.settings.completion_thread

    def run(self, prepared: Prepared) -> list[Any]:
        """Second stage: wait for the copy, run the forward pass, bring the rows back."""
        return self.complete(self.launch(prepared))

    def launch(self, prepared: Prepared) -> Launched:
        """Wait (on the device) for the copy, run the forward pass and start the output's
        copy to the host, without waiting for it: on a GPU, into pinned memory on the compute
        stream, with an event that fires when it is there."""
        self.use_device()
        with torch.inference_mode(), self._on_compute_stream():
            batch = self._arrived(prepared)
            output = self.forward(batch)
            output_spec = self.spec.output
            per_position = (
                isinstance(batch, Padded)
                and output_spec is not None
                and output_spec.shape[:1] == (-1,)
            )
            mask = batch.mask if per_position else None
            if output_spec is not None:
                read_broken = _non_finite_rows(output, mask, prepared.size)
            else:
                read_broken = _non_finite_in_any(tensors_of(output), prepared.size)
            done = None
            if self._compute_stream is not None:
                output = _to_host(output)
                done = torch.cuda.Event()
                done.record(self._compute_stream)
        lengths = batch.lengths if per_position else None
        return Launched(output, done, read_broken, prepared.size, lengths, prepared.rows)

    def complete(self, launched: Launched) -> list[Any]:
        """Wait for a launched batch's output to reach the host, and cut it into rows; a row
        whose output holds NaN or infinity becomes that instance's error."""
        if launched.done is not None:
            launched.done.synchronize()
        with torch.inference_mode():
            rows = self.split(launched.output)
            broken = launched.read_broken()
        if launched.rows >= 0 and len(rows) != launched.rows:
            # Rows cut to the batch would hand each client a neighbour's answer.
            raise InferenceError(
                f"the model returned {len(rows)} rows for a batch of {launched.rows}: its "
                "output must have one row per instance, in order"
            )
        rows = rows[: launched.size]
        self._check_rows(rows)
        if launched.lengths is not None:
            # A per-position output (one row per token): cut each back to its own length.
            rows = [row[: length[0]] for row, length in zip(rows, launched.lengths, strict=True)]
        for index in broken:
            # JSON has no NaN: it would be served as null, with a label chosen from garbage.
            rows[index] = InferenceError("the model's output for this input is NaN or infinite")
        return rows

    def _check_rows(self, rows: list[Any]) -> None:
        """Each row holds as many values as the spec's output says (InferenceError if not):
        a model whose output disagrees with its spec gives no answer rather than a wrong one."""
        if not rows:
            return
        columns: list[tuple[TensorSpec, list[Any]]]
        if self.spec.output is not None:
            columns = [(self.spec.output, rows)]
        elif all(isinstance(row, dict) for row in rows):
            columns = [(t, [row.get(t.name) for row in rows]) for t in self.spec.output_specs]
        else:
            return
        for spec, values in columns:
            if -1 in spec.shape:
                continue  # a variable output: its length is the instance's own
            expected = math.prod(spec.shape)
            for value in values:
                if isinstance(value, np.ndarray) and value.size != expected:
                    raise InferenceError(
                        f"output {spec.name!r} has {value.size} values per instance where "
                        f"the spec says {expected} (shape {list(spec.shape)})"
                    )

    def setup(self) -> None:
        """Load the module unless one was given, and compile it if configured.

        Every failure is a ModelLoadError.
        """
        self.use_device()
        if self.module is None:
            try:
                self.module = self.load(self.device)
            except ModelLoadError:
                raise
            except Exception as exc:
                raise ModelLoadError(
                    f"{type(self).__name__}.load failed: {type(exc).__name__}: {exc}"
                ) from exc
        if self._weights_dtype is not None:
            self._reference = self.module
            self.module = _cast_weights(self.module, self._weights_dtype)
        self._eager_module = self.module
        if self.settings.compile != "off":
            self._batch_buckets = self.settings.warmup_batch_sizes
            if self._variable_axes and not self._bounded_lengths():
                raise ModelLoadError(
                    "a compiled model with variable-length inputs needs length_buckets up to "
                    "the input's max_shape, so that it sees a bounded set of shapes"
                )
            # One more for warm-up's first check, a batch of two that is not padded.
            graphs = len(self.graph_shapes()) + 1
            self.graph_gate = GraphGate(_compile_backend(self.settings), self.spec.name)
            self.module = torch.compile(
                self.module,
                backend=self.graph_gate,
                dynamic=False,
                **_recompile_limit(graphs),
            )

    def warm(self) -> None:
        """Make the model ready to serve, in the thread that will serve it: warm up at each
        batch size (compiling, and capturing CUDA graphs, when configured), tune the batch cap,
        check reduced precision. Every failure is a ModelLoadError.

        The thread matters: torch keeps compiled code's CUDA graph trees per thread, so a
        model warmed in one thread and served from another would capture everything again
        while serving, or fail outright on some torch versions.
        """
        settings, name = self.settings, self.spec.name
        self.use_device()
        if settings.compile != "off":
            graph_trees_for_this_thread()
        if settings.warmup:
            started = time.monotonic()
            self.warm_up(settings.warmup_batch_sizes)
            logger.info(
                "warmed up %s at batch sizes %s in %.2fs",
                name,
                list(settings.warmup_batch_sizes),
                time.monotonic() - started,
            )
        if settings.warmup and settings.tune_batch_size and settings.max_batch_size > 1:
            rates = self.measure_batch_sizes(settings.warmup_batch_sizes)
            self.preferred_batch_size = choose_batch_size(rates)
            logger.info(
                "%s throughput by batch size (instances/s): %s; batches capped at %d",
                name,
                {size: round(rate) for size, rate in rates.items()},
                self.preferred_batch_size,
            )
        if settings.precision != "fp32":
            error = self.check_precision(settings.precision_tolerance)
            logger.info(
                "%s in %s: largest difference from fp32 is %.4f of the output's scale",
                name,
                settings.precision,
                error,
            )
        self.close_compile_gate()

    def close_compile_gate(self) -> None:
        """Loading is over: from now on a new graph is an error, not a silent recompile."""
        if self.graph_gate is not None:
            self.graph_gate.close()

    def graph_shapes(self) -> list[tuple[int, int | None]]:
        """Every (batch size, length bound) a compiled model is given, each one graph.

        Batches are padded up to a warm-up size, and variable lengths up to a length bucket,
        so this set is closed: warming each one means none compiles while serving.
        """
        bounds: list[int | None] = list(self._buckets) if self._buckets else [None]
        return [(size, bound) for size in self._batch_buckets for bound in bounds]

    def _bounded_lengths(self) -> bool:
        assert self._bucket_input is not None
        limit = self._bucket_input.max_shape
        if not self._buckets or limit is None:
            return False
        return all(limit[axis] <= self._buckets[-1] for axis in self._variable_axes)

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
        """Stack items into one batch on the model's device; pad variable-length ones.

        For a model of several inputs, a tuple of one tensor per input, in the spec's order:
        each stacked, or padded with its `pad_value` to its longest (no mask: a model that
        needs one takes it as an input)."""
        if self.spec.input is None:
            return tuple(
                self._collate_input(t, [item[t.name] for item in items])
                for t in self.spec.input_specs
            )
        if self._variable_axes:
            return self._pad(items)
        return self._stacked(items, self._input_dtype)

    def _collate_input(self, spec: TensorSpec, items: list[np.ndarray[Any, Any]]) -> torch.Tensor:
        """One input of a model of several: stacked, or padded to the longest (and up to its
        length bucket, for the input that decides buckets)."""
        dtype = _TORCH_DTYPES.get(spec.dtype)
        if not spec.variable:
            return self._stacked(items, dtype)
        shape = self._padded_shape(items, bucketed=spec is self._bucket_input)
        host = self._host_buffer((len(items), *shape), items[0].dtype)
        values = host.numpy()
        values.fill(spec.pad_value)
        for i, item in enumerate(items):
            values[i][_prefix(item.shape)] = item
        return self._to_device(host, dtype or host.dtype)

    def forward(self, batch: Any) -> Any:
        """Run the model, in the configured precision. A Padded batch passes (values, mask),
        and a tuple (several inputs) its tensors, in order."""
        if self._weights_dtype is not None:
            return self._call_module(_cast_floats(batch, self._weights_dtype))
        if self._autocast is None:
            return self._call_module(batch)
        with torch.autocast(device_type=self.device.type, dtype=self._autocast):
            return self._call_module(batch)

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

    # What the batcher and loader ask of a model.

    def bucket(self, item: Any) -> int | None:
        """The length bucket of an item: batches only mix items of one bucket."""
        if not self._buckets:
            return None
        if self.spec.input is None:
            assert self._bucket_input is not None
            item = item[self._bucket_input.name]
        return bisect.bisect_left(self._buckets, int(np.shape(item)[self._variable_axes[0]]))

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

    def check_precision(self, tolerance: float) -> float:
        """Compare the configured precision's output with fp32 on sample inputs.

        Returns the largest difference relative to the fp32 output's largest magnitude, and
        raises ModelLoadError if it is above `tolerance`.
        """
        if self._autocast is None and self._weights_dtype is None:
            return 0.0
        # The module as loaded, in fp32: with weights cast at load, the copy kept for this.
        reference_module = self._reference if self._reference is not None else self._eager_module
        rng = np.random.default_rng(0)
        count = min(8, self.settings.max_batch_size)
        samples = [self.preprocess(self.spec.sample(rng)) for _ in range(count)]
        with torch.inference_mode():
            # Through prepare, so a compiled model gets a warmed-up (padded) batch size.
            batch = self._arrived(self.prepare(samples))
            # The fp32 reference comes from the module as loaded, never compiled: a compiled
            # one under CUDA graphs hands back its own output buffer, which the next replay
            # overwrites. The copy keeps it whatever module ran.
            references = [
                t.float().clone()[:count] for t in tensors_of(self._call(reference_module, batch))
            ]
            reduced = [t.float()[:count] for t in tensors_of(self.forward(batch))]
        self._reference = None  # checked: the fp32 copy's memory goes
        error = 0.0
        for got, reference in zip(reduced, references, strict=True):
            scale = float(reference.abs().max()) or 1.0
            error = max(error, float((got - reference).abs().max()) / scale)
        if not error <= tolerance:  # also catches NaN
            raise ModelLoadError(
                f"{self.precision} output differs from fp32 by {error:.4f} of its scale, "
                f"more than the tolerance {tolerance}: use fp32 or raise precision_tolerance"
            )
        return error

    def measure_batch_sizes(
        self, batch_sizes: tuple[int, ...], rounds: int = 5
    ) -> dict[int, float]:
        """Instances per second of the whole batch path at each size (best of `rounds`).

        Each round runs every size in turn, so a slow moment of the machine slows one round
        of every size rather than all the rounds of one size, which would then lose the pick.
        """
        example = self.preprocess(self.spec.example())
        best = dict.fromkeys(batch_sizes, float("inf"))
        for _ in range(rounds):
            for size in batch_sizes:
                best[size] = min(best[size], _timed(self, [example] * size))
        return {size: size / max(seconds, 1e-9) for size, seconds in best.items()}

    def warm_up(self, batch_sizes: tuple[int, ...] = (2,)) -> None:
        """Run batches end to end and check the output's shape against the spec.

        Catches a spec that does not match the model before the server reports ready, and
        runs each batch size the server will use once, so none pays first-call costs later.
        """
        text = [t.name for t in self.spec.input_specs if t.dtype == "string"]
        if text and type(self).preprocess is Handler.preprocess:
            raise ModelLoadError(
                f"the input {text[0]!r} is text (dtype string): serve it with a handler whose "
                "preprocess turns each text into a tensor, a tokenizer say "
                "(examples/text_classifier)"
            )
        example = self.preprocess(self.spec.example())
        try:
            with torch.inference_mode():
                # Two rows, to see the batch dimension; one when batches never hold more.
                pair = [example] * min(2, self.settings.max_batch_size)
                output = self.forward(self.collate(pair))
        except Exception as exc:
            if self._variable_axes and _refused_the_mask(exc):
                raise ModelLoadError(
                    f"the model takes fewer arguments than a padded batch gives: an input of "
                    f"variable length ({self.spec.describe_inputs()}) is padded and the model "
                    "called as model(values, mask), the mask True at real positions. Give its "
                    'forward a mask parameter, or set "mask": false on the input in the spec '
                    "to call model(values) alone"
                ) from exc
            raise ModelLoadError(
                f"warm-up batch failed: does the input spec {self.spec.describe_inputs()} match "
                f"the model? {type(exc).__name__}: {exc}"
            ) from exc
        self._check_outputs(output)
        if (
            self.spec.labels is not None
            and self.spec.output_kind == "logits"
            and isinstance(output, torch.Tensor)
            and looks_like_probabilities(output)
        ):
            logger.warning(
                "%s: the output is declared as logits (the default), but its rows already sum "
                "to 1 within [0, 1], so /predict would apply softmax twice; if the model ends "
                'in softmax, set output.kind = "probabilities" in its spec',
                self.spec.name,
            )
        if self._batch_buckets:
            # Compiled: every shape it will ever see, each its own graph, compiled now. CUDA
            # graph trees run a shape's first call plain and record on the second, so under
            # reduce-overhead a shape met once here recorded on its first served batch
            # (7 ms against 0.7 on an H100); the third call is the first replay.
            calls = 3 if self.settings.compile == "reduce-overhead" else 1
            for size, bound in self.graph_shapes():
                for _ in range(calls):
                    self([self.preprocess(self.spec.example(bound or 1))] * size)
            return
        # The full path at each size as the batcher will send it, and at each length bucket.
        for size in batch_sizes:
            self([example] * size)
        for bound in self._buckets or ():
            self([self.preprocess(self.spec.example(bound))] * max(batch_sizes))

    def _check_outputs(self, output: Any) -> None:
        """ModelLoadError unless the warm-up output has the spec's outputs and shapes."""
        specs = self.spec.output_specs
        if len(specs) == 1:
            named = {specs[0].name: output}
        elif isinstance(output, dict) and set(output) == {t.name for t in specs}:
            named = output
        elif isinstance(output, (tuple, list)) and len(output) == len(specs):
            named = {t.name: value for t, value in zip(specs, output, strict=True)}
        else:
            raise ModelLoadError(
                f"the spec lists {len(specs)} outputs {[t.name for t in specs]}; the model "
                f"returned {type(output).__name__}: return a tuple in that order, or a dict "
                "of them by name"
            )
        for t in specs:
            value = named[t.name]
            got = tuple(getattr(value, "shape", ())[1:])
            if isinstance(value, torch.Tensor) and not t.fits(got):
                which = "output" if len(specs) == 1 else f"output {t.name!r}"
                raise ModelLoadError(
                    f"warm-up {which} shape {list(got)} does not match the spec's output "
                    f"{t.describe()}"
                )

    def _call_module(self, batch: Any) -> Any:
        return self._call(self.module, batch)

    def _call(self, module: Any, batch: Any) -> Any:
        assert module is not None, "setup() has not run"
        if isinstance(batch, Padded):
            if self.spec.input is not None and not self.spec.input.mask:
                return module(batch.values)
            return module(batch.values, batch.mask)
        if isinstance(batch, tuple):
            return module(*batch)
        return module(batch)

    def _arrived(self, prepared: Prepared) -> Any:
        """The prepared batch, once its copy to the device is done (for the current stream)."""
        if prepared.copied is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(prepared.copied)
            _used_on(prepared.batch, compute)
        return prepared.batch

    def _on_compute_stream(self) -> Any:
        if self._compute_stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._compute_stream)

    def use_device(self) -> None:
        """Make this model's GPU the current one of the calling thread.

        A new thread starts on GPU 0: without this, a `cuda:1` model's worker would make a
        context on GPU 0, and unqualified calls (synchronize, a user hook's `.cuda()`) would
        land there. Cheap when already set, so each stage calls it.
        """
        index = self.device.index
        on_gpu = self.device.type == "cuda" and index is not None
        if on_gpu and torch.cuda.current_device() != index:
            torch.cuda.set_device(index)

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
        if bucketed and self._buckets:
            axis = self._variable_axes[0]
            index = bisect.bisect_left(self._buckets, shape[axis])
            if index < len(self._buckets):  # past the last bound: the longest item decides
                shape[axis] = self._buckets[index]
        return shape

    def _pad(self, items: list[np.ndarray[Any, Any]]) -> Padded:
        """Pad each variable dimension to the longest item, or up to its length bucket."""
        shape = self._padded_shape(items, bucketed=True)
        spec = self._bucket_input
        assert spec is not None
        values_host = self._host_buffer((len(items), *shape), spec.numpy_dtype)
        values = values_host.numpy()
        values.fill(spec.pad_value)
        mask_shape = [shape[axis] for axis in self._variable_axes]
        mask_host = self._host_buffer((len(items), *mask_shape), np.dtype(bool))
        mask = mask_host.numpy()
        mask.fill(False)
        lengths = []
        for i, item in enumerate(items):
            values[i][_prefix(item.shape)] = item
            own = tuple(item.shape[axis] for axis in self._variable_axes)
            mask[i][_prefix(own)] = True
            lengths.append(own)
        return Padded(
            self._to_device(values_host, self._input_dtype or values_host.dtype),
            self._to_device(mask_host, torch.bool),
            lengths,
        )


def _refused_the_mask(exc: Exception) -> bool:
    """Whether a call failed for one positional argument too many (the mask), as Python and
    a torch.export program each say it."""
    text = str(exc)
    too_many = isinstance(exc, TypeError) and "positional argument" in text and "given" in text
    return too_many or "Trying to flatten user inputs" in text


def _cast_weights(module: Any, dtype: torch.dtype) -> Any:
    """A copy of `module` with its floating weights and buffers in `dtype`."""
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(
            f"casting the weights needs a torch.nn.Module, not {type(module).__name__}: "
            "use precision fp16 or bf16 (autocast) for this model"
        )
    try:
        return copy.deepcopy(module).to(dtype)
    except Exception as exc:
        raise ModelLoadError(
            f"the weights could not be cast to {dtype}: {type(exc).__name__}: {exc}"
        ) from exc


def _cast_floats(batch: Any, dtype: torch.dtype) -> Any:
    """A batch with its floating tensors in `dtype` (a mask or token ids stay as they are)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, Padded):
        return batch._replace(values=_cast_floats(batch.values, dtype))
    if isinstance(batch, tuple):
        return tuple(_cast_floats(value, dtype) for value in batch)
    return batch


def _to_host(output: Any) -> Any:
    """A model's output with each device tensor's copy to the host started, not awaited:
    `non_blocking` from CUDA lands in pinned memory, on the current stream."""
    if isinstance(output, torch.Tensor):
        return output.to("cpu", non_blocking=True) if output.device.type != "cpu" else output
    if isinstance(output, dict):
        return {key: _to_host(value) for key, value in output.items()}
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a named tuple
        return type(output)(*(_to_host(value) for value in output))
    if isinstance(output, (tuple, list)):
        return type(output)(_to_host(value) for value in output)
    return output


def _host_array(value: torch.Tensor) -> np.ndarray[Any, Any]:
    """An output on the host: floating point as float32 (numpy has no bfloat16), integers
    and booleans as they are (an id past 2**24 survives). A copy: the rows outlive this
    batch, and a CPU output may be a view of the model's."""
    if value.is_floating_point():
        value = value.float()
    return value.cpu().numpy().copy()


def tensors_of(output: Any) -> list[Any]:
    """A model's output as a list: its one tensor, or each of a tuple, list or dict."""
    if isinstance(output, dict):
        return list(output.values())
    if isinstance(output, (tuple, list)):
        return list(output)
    return [output]


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


def looks_like_probabilities(output: torch.Tensor) -> bool:
    """Whether every row is already a probability distribution: within [0, 1], summing to 1."""
    rows = output.detach().float().reshape(-1, output.shape[-1])
    sums = rows.sum(dim=-1)
    return bool(
        rows.numel() > 0
        and (rows >= 0).all()
        and (rows <= 1).all()
        and torch.allclose(sums, torch.ones_like(sums), atol=1e-3)
    )


def choose_batch_size(rates: dict[int, float], tolerance: float = 0.01) -> int:
    """The smallest batch size whose throughput is within `tolerance` (the timing noise) of
    the best.

    On a GPU throughput usually grows with the batch, and this is the largest size; on a CPU
    it often peaks early (cache), and larger batches would cost throughput and latency both.
    The cap only binds when more requests wait than it holds, that is under load, where the
    batch size with the best throughput also gives the shortest queues: so no more than the
    noise is traded for smaller batches. (With 5%, the encoder's cap fell to 4 where 8 ran 4%
    faster, and served throughput followed the cap.)
    """
    best = max(rates.values())
    return min(size for size, rate in rates.items() if rate >= best * (1 - tolerance))


def _used_on(batch: Any, stream: Any) -> None:
    """Tell the caching allocator that the batch, made on the copy stream, is used on `stream`,
    so its memory is not reused before the forward pass is done with it."""
    tensors = batch if isinstance(batch, tuple) else (batch,)
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            tensor.record_stream(stream)


def _torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def _prefix(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def _timed(handler: Handler, batch: list[Any]) -> float:
    started = time.perf_counter()
    handler(batch)
    return time.perf_counter() - started


def _non_finite_rows(output: Any, mask: torch.Tensor | None, size: int) -> Callable[[], list[int]]:
    """The rows, among the first `size`, whose output holds NaN or infinity, to read once the
    output is on the host.

    With the `mask` of a per-position output, padded positions do not count: they are cut
    away. One vectorised check per batch; an output that is not one floating tensor is not
    checked. On a GPU the flags travel to pinned memory behind the output, without a
    synchronisation of their own.
    """
    if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.ndim < 1:
        return list
    if output.device.type == "cpu" and output.dtype in _NUMPY_FLOATS:
        # numpy on the tensor's own memory: one pass, where torch's six small ops cost
        # ~60 µs a batch, more than a light model's whole forward pass at batch 1.
        return _non_finite_host(output.detach().numpy()[:size], mask, size)
    finite = torch.isfinite(output[:size])
    if mask is not None and finite.ndim >= mask.ndim:
        mask = mask[:size].to(finite.device)
        finite = finite | ~mask.reshape(*mask.shape, *[1] * (finite.ndim - mask.ndim))
    bad = ~finite.reshape(finite.shape[0], -1).all(dim=1)
    done = None
    if bad.is_cuda:
        host = torch.empty(bad.shape, dtype=torch.bool, pin_memory=True)
        host.copy_(bad, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        bad = host

    def read() -> list[int]:
        if done is not None:
            done.synchronize()  # at once: splitting the output waited for the same stream
        flags: list[int] = bad.nonzero().flatten().tolist() if bool(bad.any()) else []
        return flags

    return read


_NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)


def _non_finite_in_any(outputs: list[Any], size: int) -> Callable[[], list[int]]:
    """The rows, among the first `size`, with NaN or infinity in any of several outputs."""
    readers = [_non_finite_rows(output, None, size) for output in outputs]
    return lambda: sorted({row for read in readers for row in read()})


def _non_finite_host(
    output: np.ndarray[Any, Any], mask: torch.Tensor | None, size: int
) -> Callable[[], list[int]]:
    finite = np.isfinite(output)
    if mask is not None and finite.ndim >= mask.ndim:
        kept = mask[:size].cpu().numpy()
        finite |= ~kept.reshape(*kept.shape, *[1] * (finite.ndim - kept.ndim))
    bad = ~finite.reshape(finite.shape[0], -1).all(axis=1)
    flags: list[int] = np.flatnonzero(bad).tolist() if bad.any() else []
    return lambda: flags


class RecompileWhileServing(RuntimeError):
    """A compiled model met a shape it was not warmed up for."""


class GraphGate:
    """A torch.compile backend around the real one: it counts the graphs compiled, and once
    the model serves it refuses new ones.

    Every shape a served batch can have is compiled at warm-up (see `Handler.graph_shapes`),
    so a compile while serving means a shape was missed: raising here fails that batch with
    a clear error instead of stalling it for a compile, or, past torch's recompile limit,
    silently running it eager. Per model, unlike torch's process-wide compiler stance, which
    would stop models that are still loading from compiling.
    """

    def __init__(self, inner: Any, model: str) -> None:
        self.inner = inner
        self.model = model
        self.graphs = 0
        self.serving = False

    def __call__(self, graph: Any, example_inputs: list[Any]) -> Any:
        if self.serving:
            shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]
            raise RecompileWhileServing(
                f"{self.model}: a new graph was needed while serving (inputs {shapes}); "
                "every shape should have been compiled at warm-up"
            )
        self.graphs += 1
        return self.inner(graph, example_inputs)

    def close(self) -> None:
        self.serving = True

    def __getattr__(self, name: str) -> Any:
        # torch asks the backend for its config and to reset; those are the inner one's.
        return getattr(self.inner, name)


def graph_trees_for_this_thread() -> None:
    """Give the calling thread its own CUDA graph trees, where torch would not.

    Inductor keeps CUDA graph trees in thread-locals that, before torch 2.12, only the thread
    that imported it and autograd's threads have: a model compiled with `reduce-overhead` and
    warmed in a worker thread failed its first batch with a bare AssertionError (seen with
    torch 2.11 on an H100). Newer torch sets them up in any thread; this does the same.
    """
    from torch._inductor import cudagraph_trees as trees

    local, key = trees.local, "tree_manager_containers"
    if hasattr(local, key) or torch._C._is_key_in_tls(key):
        return
    local.tree_manager_containers = {}
    local.tree_manager_locks = collections.defaultdict(threading.Lock)


def _compile_backend(settings: ModelSettings) -> Any:
    """The backend torch.compile would build for these settings (mode applies to inductor)."""
    mode = None if settings.compile == "default" else settings.compile
    if settings.compile_backend == "inductor":
        return torch._TorchCompileInductorWrapper(mode, None, False)
    return torch._dynamo.lookup_backend(settings.compile_backend)


# Graphs reserved by the compiled models of this process, for torch versions whose
# torch.compile has no limit of its own per call.
_reserved_graphs = 0


def _recompile_limit(graphs: int) -> dict[str, Any]:
    """Room for `graphs` graphs of this model, and an error rather than eager past it.

    torch._dynamo's recompile limit (8 by default) counts the graphs of one code object, and
    every copy of a module shares its `forward`: past the limit, shapes silently ran eager.
    Newer torch takes a limit per torch.compile call, isolated from other calls; older torch
    has one process-wide limit, raised here to what all compiled models reserve together.
    """
    config = torch._dynamo.config
    # The names changed over torch's versions (cache_size_limit before recompile_limit).
    _set_first(config, ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"), True)
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        return {"recompile_limit": graphs, "isolate_recompiles": True}
    global _reserved_graphs
    _reserved_graphs += graphs
    for names in (
        ("recompile_limit", "cache_size_limit"),
        ("accumulated_recompile_limit", "accumulated_cache_size_limit"),
    ):
        current = next((getattr(config, n) for n in names if hasattr(config, n)), 0)
        _set_first(config, names, max(current, _reserved_graphs))
    return {}


def _set_first(config: Any, names: tuple[str, ...], value: Any) -> None:
    """Set the first of `names` that this torch's dynamo config has."""
    for name in names:
        if hasattr(config, name):
            setattr(config, name, value)
            return
