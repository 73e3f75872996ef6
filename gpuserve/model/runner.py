"""The runner: a Handler's hooks run on its device, batch after batch.

It owns what no hook should have to get right: the streams (the copy of the next batch
overlaps the running forward pass; the output's copy to the host is started, not awaited,
so a completion thread can wait for it), pinned host memory, the configured precision
around `forward`, compile and warm-up (every shape compiled before the model serves), the
batch-size tuning, and the checks on every batch's rows (one per instance, the spec's size,
no NaN). The batcher drives it through `prepare`, `run`, and on a GPU `launch` and
`complete`; the request path calls the hooks it exposes (`preprocess`, `postprocess`,
`bucket`, `is_oom`, `is_fatal`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from gpuserve.core.errors import InferenceError, ModelLoadError
from gpuserve.handler import Handler, Padded, call_module
from gpuserve.model.compiling import (
    GraphGate,
    compile_backend,
    graph_trees_for_this_thread,
    recompile_limit,
    use_compile_cache,
)
from gpuserve.spec import TensorSpec

_AUTOCAST: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Weights cast once at load: no per-forward re-cast of every weight, as autocast does.
_CAST_WEIGHTS: dict[str, torch.dtype] = {
    "fp16-weights": torch.float16,
    "bf16-weights": torch.bfloat16,
}


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


class Runner:
    """Runs a Handler on its device: the batch function the batcher calls, and the model's
    load-time steps (`setup` in the load thread, `warm` in the worker thread that serves).
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.spec = handler.spec
        self.settings = handler.settings
        self.device = handler.device
        self.precision = self.settings.precision
        # The hooks the request path and the batcher call, bound once.
        self.preprocess = handler.preprocess
        self.postprocess = handler.postprocess
        self.bucket = handler.bucket
        self.is_oom = handler.is_oom
        self.is_fatal = handler.is_fatal
        on_gpu = self.device.type == "cuda"
        # Copies to the GPU go on their own stream, to overlap the running forward pass; the
        # forward pass runs on a stream of this copy's own, so that copies of a model on one
        # GPU overlap rather than queue on the default stream.
        self._copy_stream = torch.cuda.Stream(self.device) if on_gpu else None
        self._compute_stream = torch.cuda.Stream(self.device) if on_gpu else None
        # Autocast rather than a converted copy: the module keeps its fp32 weights, so the
        # fp32 reference at load time and the served path are the same module.
        self._autocast = _AUTOCAST.get(self.precision)
        # Or weights cast at load; the fp32 module is kept only for the precision check.
        self._weights_dtype = _CAST_WEIGHTS.get(self.precision)
        self._reference: Any = None
        # Set by `warm` when it has measured a batch size past which throughput falls.
        self.preferred_batch_size: int | None = None
        # A compiled model sees only these batch sizes (set by setup when compiling).
        self._batch_buckets: tuple[int, ...] = ()
        self.graph_gate: GraphGate | None = None
        self._eager_module: Any = handler.module

    @property
    def module(self) -> Any:
        """The handler's module: as loaded, then as cast and compiled by `setup`."""
        return self.handler.module

    @module.setter
    def module(self, module: Any) -> None:
        self.handler.module = module

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
                return Prepared(self.handler.collate(items), None, size, len(items))
            with torch.cuda.stream(self._copy_stream):
                batch = self._collate(items)
                copied = torch.cuda.Event()
                copied.record(self._copy_stream)
            return Prepared(batch, copied, size, len(items))

    def _collate(self, items: list[Any]) -> Any:
        """The handler's batch, on the device: what its collate left on the host is copied
        over here, through pinned memory and without blocking (on the current stream)."""
        batch = self.handler.collate(items)
        if self._copy_stream is None or self.device.type != "cuda":
            return batch
        return _onto(batch, self.device)

    @property
    def pipelined(self) -> bool:
        """Whether the batcher may split `run` into `launch` and `complete` on two threads:
        on a GPU (unless `completion_thread` is off), where waiting for one batch's output
        would keep the next batch from being launched."""
        return self._compute_stream is not None and self.settings.completion_thread

    def run(self, prepared: Prepared) -> list[Any]:
        """Second stage: wait for the copy, run the forward pass, bring the rows back."""
        return self.complete(self.launch(prepared))

    def forward(self, batch: Any) -> Any:
        """The handler's `forward` in the configured precision: under autocast, or with
        floating inputs cast to the weights' dtype."""
        if self._weights_dtype is not None:
            return self.handler.forward(_cast_floats(batch, self._weights_dtype))
        if self._autocast is None:
            return self.handler.forward(batch)
        with torch.autocast(device_type=self.device.type, dtype=self._autocast):
            return self.handler.forward(batch)

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
            rows = self.handler.split(launched.output)
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
                self.module = self.handler.load(self.device)
            except ModelLoadError:
                raise
            except Exception as exc:
                raise ModelLoadError(
                    f"{type(self.handler).__name__}.load failed: {type(exc).__name__}: {exc}"
                ) from exc
        if self._weights_dtype is not None:
            self._reference = self.module
            self.module = _cast_weights(self.module, self._weights_dtype)
        self._eager_module = self.module
        if self.settings.compile != "off":
            self._batch_buckets = self.settings.warmup_batch_sizes
            if self.handler.variable_axes and not self._bounded_lengths():
                raise ModelLoadError(
                    "a compiled model with variable-length inputs needs length_buckets up to "
                    "the input's max_shape, so that it sees a bounded set of shapes"
                )
            if self.settings.compile_cache_dir is not None:
                use_compile_cache(self.settings.compile_cache_dir)
            # One more for warm-up's first check, a batch of two that is not padded.
            graphs = len(self.graph_shapes()) + 1
            self.graph_gate = GraphGate(compile_backend(self.settings), self.spec.name)
            self.module = torch.compile(
                self.module,
                backend=self.graph_gate,
                dynamic=False,
                **recompile_limit(graphs),
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
        buckets = self.handler.length_buckets
        bounds: list[int | None] = list(buckets) if buckets else [None]
        return [(size, bound) for size in self._batch_buckets for bound in bounds]

    def _bounded_lengths(self) -> bool:
        handler = self.handler
        assert handler.bucket_input is not None
        limit, buckets = handler.bucket_input.max_shape, handler.length_buckets
        if not buckets or limit is None:
            return False
        return all(limit[axis] <= buckets[-1] for axis in handler.variable_axes)

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
                t.float().clone()[:count]
                for t in tensors_of(call_module(reference_module, batch, self.spec))
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
        if text and type(self.handler).preprocess is Handler.preprocess:
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
                output = self.forward(self._collate(pair))
        except Exception as exc:
            if self.handler.variable_axes and _refused_the_mask(exc):
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
        for bound in self.handler.length_buckets or ():
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
    """A batch with its floating tensors in `dtype`, whatever its shape (a mask or token ids
    stay as they are)."""
    return _map_tensors(batch, lambda t: t.to(dtype) if t.is_floating_point() else t)


def _to_host(output: Any) -> Any:
    """A model's output with each device tensor's copy to the host started, not awaited:
    `non_blocking` from CUDA lands in pinned memory, on the current stream."""
    return _map_tensors(
        output, lambda t: t.to("cpu", non_blocking=True) if t.device.type != "cpu" else t
    )


def tensors_of(output: Any) -> list[Any]:
    """A model's output as a list: its one tensor, or each of a tuple, list or dict."""
    if isinstance(output, dict):
        return list(output.values())
    if isinstance(output, (tuple, list)):
        return list(output)
    return [output]


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

    def record(tensor: torch.Tensor) -> torch.Tensor:
        tensor.record_stream(stream)
        return tensor

    _map_tensors(batch, record)


def _onto(batch: Any, device: torch.device) -> Any:
    """A batch with each of its host tensors copied to `device` through pinned memory,
    without blocking; tensors on a device already are left as they are."""
    return _map_tensors(
        batch,
        lambda t: (
            (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
            if t.device.type == "cpu"
            else t
        ),
    )


def _map_tensors(value: Any, change: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` with `change` applied to each tensor in it, its containers (tuples, named
    ones included, lists and dicts) rebuilt as they were."""
    if isinstance(value, torch.Tensor):
        return change(value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, change) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple, Padded say
        return type(value)(*(_map_tensors(item, change) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(item, change) for item in value)
    return value


def _timed(runner: Runner, batch: list[Any]) -> float:
    started = time.perf_counter()
    runner(batch)
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
