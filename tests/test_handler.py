"""The default handler hooks (collate, forward, split, postprocess) run by the runner on an
eager or compiled module: precision, streams, warm-up, compile governance, row checks."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from gpuserve.config import ModelSettings
from gpuserve.core.errors import InferenceError, ModelLoadError
from gpuserve.handler import Handler, Padded
from gpuserve.model import compiling as compiling_module
from gpuserve.model import runner as runner_module
from gpuserve.model.runner import Runner, choose_batch_size
from gpuserve.spec import ModelSpec, TensorSpec

from .helpers import CPU, DEMO


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def spec(labels: list[str] | None = None, kind: str | None = None) -> ModelSpec:
    output = TensorSpec.model_validate({"shape": (3,), "kind": kind})
    return ModelSpec(name="lin", input=TensorSpec(shape=(4,)), output=output, labels=labels)


def make(
    module: torch.nn.Module,
    labels: list[str] | None = None,
    kind: str | None = None,
    **settings: Any,
) -> Runner:
    return Runner(
        Handler(spec(labels, kind), CPU, ModelSettings(path=DEMO, **settings), module=module)
    )


class Softmaxed(torch.nn.Module):
    """A classifier that ends in softmax: its rows are probabilities already."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(Linear()(x), dim=-1)


def instances(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(4).astype(np.float32) for _ in range(n)]


def test_a_batch_gives_the_same_rows_as_each_instance_alone() -> None:
    handler = make(Linear().eval())
    batch = instances(5)
    together = handler(batch)
    alone = [handler([x])[0] for x in batch]
    assert len(together) == 5
    for a, b in zip(together, alone, strict=True):
        assert a == pytest.approx(b, abs=1e-6)


def test_collate_stacks_on_the_device_in_the_spec_dtype() -> None:
    handler = make(Linear())
    batch = handler.handler.collate(instances(3))
    assert batch.shape == (3, 4) and batch.dtype == torch.float32 and batch.device.type == "cpu"


def test_a_labelled_model_returns_label_and_probabilities() -> None:
    handler = make(Linear().eval(), ["cat", "dog", "eel"])
    x = instances(1)
    (row,) = handler(x)
    result = handler.postprocess(row)
    logits = Linear()(torch.from_numpy(x[0])).detach()
    assert result["label"] == ["cat", "dog", "eel"][int(logits.argmax())]
    assert sum(result["probabilities"]) == pytest.approx(1.0, abs=1e-6)


def test_rows_are_the_models_own_float32_values_whatever_the_kind() -> None:
    """split never transforms: /v2 serves its rows as they are."""
    x = instances(3)
    expected = Linear()(torch.from_numpy(np.stack(x))).detach().numpy()
    for kind in (None, "logits", "probabilities", "scores"):
        rows = make(Linear().eval(), ["a", "b", "c"], kind)(x)
        assert all(row.dtype == np.float32 for row in rows)
        np.testing.assert_allclose(np.stack(rows), expected, rtol=1e-6, atol=1e-7)


def test_probabilities_from_the_model_are_not_softmaxed_again() -> None:
    handler = make(Softmaxed().eval(), ["cat", "dog", "eel"], "probabilities")
    x = instances(1)
    (row,) = handler(x)
    result = handler.postprocess(row)
    expected = Softmaxed()(torch.from_numpy(x[0])).detach().numpy()
    np.testing.assert_allclose(result["probabilities"], expected, rtol=1e-6)
    assert result["label"] == ["cat", "dog", "eel"][int(expected.argmax())]


def test_scores_are_served_as_scores() -> None:
    handler = make(Linear().eval(), ["cat", "dog", "eel"], "scores")
    x = instances(1)
    (row,) = handler(x)
    result = handler.postprocess(row)
    expected = Linear()(torch.from_numpy(x[0])).detach().numpy()
    assert set(result) == {"label", "scores"}
    np.testing.assert_allclose(result["scores"], expected, rtol=1e-6)
    assert result["label"] == ["cat", "dog", "eel"][int(expected.argmax())]


def test_an_input_has_no_kind() -> None:
    with pytest.raises(ValueError, match="kind describes an output"):
        ModelSpec.model_validate(
            {"name": "m", "input": {"shape": [4], "kind": "logits"}, "output": {"shape": [3]}}
        )


def test_logits_that_look_like_probabilities_are_warned_about_at_warm_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    labels = ["cat", "dog", "eel"]
    with caplog.at_level("WARNING", logger="gpuserve.model.loading"):
        make(Linear().eval(), labels, tune_batch_size=False).warm()
    assert not [r for r in caplog.records if "softmax twice" in r.getMessage()]
    with caplog.at_level("WARNING", logger="gpuserve.model.loading"):
        make(Softmaxed().eval(), labels, tune_batch_size=False).warm()
    (warning,) = [r for r in caplog.records if "softmax twice" in r.getMessage()]
    assert 'output.kind = "probabilities"' in warning.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="gpuserve.model.loading"):
        make(Softmaxed().eval(), labels, "probabilities", tune_batch_size=False).warm()
    assert not [r for r in caplog.records if "softmax twice" in r.getMessage()]


def test_an_unlabelled_model_returns_raw_rows() -> None:
    handler = make(Linear().eval())
    x = instances(1)
    (row,) = handler(x)
    expected = Linear()(torch.from_numpy(x[0])).detach().tolist()
    assert row == pytest.approx(expected, abs=1e-6)


def test_the_forward_pass_runs_under_inference_mode() -> None:
    seen: list[bool] = []

    class Spy(Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.is_inference_mode_enabled())
            return super().forward(x)

    make(Spy())(instances(1))
    assert seen == [True]


def test_warm_up_runs_the_whole_path() -> None:
    calls: list[int] = []

    class Counting(Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape[0])
            return super().forward(x)

    make(Counting()).warm_up((1, 4, 32))
    assert calls == [2, 1, 4, 32]  # the shape check, then each batch size once


def test_bf16_runs_under_autocast_and_stays_close_to_fp32() -> None:
    handler = make(Linear().eval(), precision="bf16")
    with torch.inference_mode():
        out = handler.forward(handler.handler.collate(instances(4)))
    assert out.dtype == torch.bfloat16
    error = handler.check_precision(tolerance=0.05)
    assert 0 < error < 0.05


def test_bf16_weights_are_cast_once_at_load_and_checked_against_fp32() -> None:
    original = Linear().eval()
    handler = make(original, precision="bf16-weights")
    handler.setup()
    assert all(p.dtype == torch.bfloat16 for p in handler.module.parameters())
    assert all(p.dtype == torch.float32 for p in original.parameters())  # a copy was cast
    rows = handler(instances(4))  # float32 instances in, float32 rows out
    assert rows[0].dtype == np.float32
    error = handler.check_precision(tolerance=0.05)
    assert 0 < error < 0.05
    assert handler._reference is None  # the fp32 copy is let go once checked


def test_cast_weights_get_floating_inputs_in_their_dtype_whatever_the_batchs_shape() -> None:
    seen: dict[str, torch.dtype] = {}

    class ByName(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 3)

        def forward(self, batch: dict[str, Any]) -> torch.Tensor:
            seen.update({name: value.dtype for name, value in batch.items()})
            return self.layer(batch["x"]) + batch["ids"].sum()

    class DictBatches(Handler):  # a custom collate: a dict of tensors
        def collate(self, items: list[Any]) -> Any:
            x = torch.from_numpy(np.stack(items))
            return {"x": x, "ids": torch.zeros(len(items), dtype=torch.int64)}

        def forward(self, batch: Any) -> Any:
            assert self.module is not None
            return self.module(batch)

    settings = ModelSettings(path=DEMO, precision="bf16-weights")
    runner = Runner(DictBatches(spec(), CPU, settings, module=ByName().eval()))
    runner.setup()
    assert len(runner(instances(2))) == 2
    assert seen == {"x": torch.bfloat16, "ids": torch.int64}


def test_casting_weights_needs_a_module() -> None:
    handler = make(Linear().eval(), precision="fp16-weights")
    handler.module = lambda x: x
    with pytest.raises(ModelLoadError, match=r"needs a torch\.nn\.Module"):
        handler.setup()


def test_a_precision_outside_the_tolerance_fails_the_load() -> None:
    handler = make(Linear().eval(), precision="bf16")
    with pytest.raises(ModelLoadError, match=r"bf16 output differs from fp32"):
        handler.check_precision(tolerance=1e-9)


def test_fp32_has_nothing_to_check() -> None:
    handler = make(Linear().eval())
    with torch.inference_mode():
        assert handler.forward(handler.handler.collate(instances(1))).dtype == torch.float32
    assert handler.check_precision(tolerance=1e-9) == 0.0


def test_out_of_memory_errors_are_recognised() -> None:
    handler = make(Linear())
    assert handler.is_oom(MemoryError())
    assert handler.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not handler.is_oom(RuntimeError("shape mismatch"))


@pytest.mark.parametrize(
    ("rates", "chosen"),
    [
        ({1: 100.0, 2: 180.0, 4: 200.0, 8: 198.0, 16: 150.0}, 4),  # a CPU: peaks, then falls
        ({1: 10.0, 2: 20.0, 4: 40.0, 8: 80.0}, 8),  # a GPU: grows with the batch
        ({1: 100.0, 2: 99.5, 4: 99.2}, 1),  # flat within the noise: the smallest
        # The encoder measured at load on 2026-11-25: 4 is 4% short of 8, so not taken.
        ({1: 161.0, 2: 203.0, 4: 216.0, 8: 226.0, 16: 226.0, 32: 199.0}, 8),
    ],
)
def test_the_chosen_batch_size_is_the_smallest_near_the_best(
    rates: dict[int, float], chosen: int
) -> None:
    assert choose_batch_size(rates) == chosen


def test_measuring_batch_sizes_runs_each_size() -> None:
    rates = make(Linear().eval()).measure_batch_sizes((1, 2, 4), rounds=2)
    assert set(rates) == {1, 2, 4} and all(rate > 0 for rate in rates.values())


def test_measuring_batch_sizes_goes_round_every_size_in_turn() -> None:
    handler = make(Linear().eval())
    seen: list[int] = []
    original = handler.run

    def run(prepared: Any) -> list[Any]:
        seen.append(prepared.size)
        return original(prepared)

    handler.run = run  # type: ignore[method-assign]
    handler.measure_batch_sizes((1, 2, 4), rounds=3)
    assert seen == [1, 2, 4] * 3


class MaskedMean(torch.nn.Module):
    """A token model that honours its mask: mean of the real positions' embeddings."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).float()
        pooled = (self.embed(ids) * weights).sum(1) / weights.sum(1)
        return self.head(pooled)


def token_handler(output_shape: tuple[int, ...] = (3,), **settings: Any) -> Runner:
    tokens = ModelSpec(
        name="tokens",
        input=TensorSpec(name="ids", shape=(-1,), dtype="int64", min=0, max=49, max_shape=(16,)),
        output=TensorSpec(shape=output_shape),
    )
    return Runner(Handler(tokens, CPU, ModelSettings(path=DEMO, **settings), module=MaskedMean()))


class IdsOnly(torch.nn.Module):
    """A token model whose forward takes the ids alone (padding is id 0, embedded as 0)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 3, padding_idx=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids).sum(1)


def test_a_model_without_a_mask_parameter_is_told_how_to_be_served() -> None:
    spec = ModelSpec(
        name="ids",
        input=TensorSpec(name="ids", shape=(-1,), dtype="int64", min=1, max=49, max_shape=(16,)),
        output=TensorSpec(shape=(3,)),
    )
    refused = Runner(Handler(spec, CPU, ModelSettings(path=DEMO), module=IdsOnly()))
    with pytest.raises(ModelLoadError) as caught:
        refused.warm_up()
    message = caught.value.message
    assert "called as model(values, mask)" in message and '"mask": false' in message
    # Followed, the advice serves it: each instance's answer is its own unpadded forward.
    alone = spec.model_copy(update={"input": spec.input.model_copy(update={"mask": False})})
    handler = Runner(Handler(alone, CPU, ModelSettings(path=DEMO), module=IdsOnly()))
    handler.warm_up()
    items = [np.array([1, 2, 3]), np.array([4]), np.arange(1, 12)]
    with torch.inference_mode():
        for got, item in zip(handler(items), items, strict=True):
            expected = IdsOnly()(torch.from_numpy(item)[None]).numpy()[0]
            np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_variable_length_instances_are_padded_and_masked() -> None:
    handler = token_handler()
    batch = handler.handler.collate([np.array([1, 2, 3]), np.array([4])])
    assert isinstance(batch, Padded)
    assert batch.values.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch.mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.lengths == [(3,), (1,)]


def test_a_padded_batch_gives_each_instance_its_result_alone() -> None:
    handler = token_handler()
    rng = np.random.default_rng(1)
    items = [rng.integers(0, 50, n) for n in (1, 7, 3, 16, 2)]
    together = handler(items)
    for got, item in zip(together, items, strict=True):
        assert got == pytest.approx(handler([item])[0], abs=1e-5)


def test_length_buckets_group_and_pad_up_to_the_bound() -> None:
    handler = token_handler(length_buckets=[4, 8])
    assert [handler.bucket(np.zeros(n)) for n in (1, 4, 5, 8, 9)] == [0, 0, 1, 1, 2]
    collate = handler.handler.collate
    assert collate([np.ones(3, np.int64), np.ones(5, np.int64)]).values.shape == (2, 8)
    # Past the last bound, the longest item sets the length.
    assert collate([np.ones(11, np.int64)]).values.shape == (1, 11)
    assert token_handler().bucket(np.zeros(3)) is None


def test_per_position_outputs_are_cut_back_to_each_instance_length() -> None:
    handler = token_handler(output_shape=(-1, 8))
    handler.module = lambda ids, mask: torch.ones(*ids.shape, 8) * mask.unsqueeze(-1)
    short, long = handler([np.array([1]), np.array([1, 2, 3])])
    assert len(short) == 1 and len(long) == 3


def test_warm_up_runs_each_length_bucket_at_the_largest_batch() -> None:
    handler = token_handler(length_buckets=[4, 8, 32])
    seen: list[tuple[int, ...]] = []
    module = handler.module

    def spy(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(ids.shape))
        return module(ids, mask)

    handler.module = spy
    handler.warm_up((1, 2))
    # The shape check, the batch sizes at length 1 (padded to the first bucket), then each
    # bucket; the last holds 16 ids at most (max_shape) and is padded to its bound, 32.
    assert seen == [(2, 4), (1, 4), (2, 4), (2, 4), (2, 8), (2, 32)]


def test_prepare_then_run_is_the_whole_batch_path() -> None:
    handler = make(Linear().eval())
    batch = instances(3)
    prepared = handler.prepare(batch)
    assert prepared.copied is None  # the CPU: nothing to wait for
    np.testing.assert_array_equal(handler.run(prepared), handler(batch))


@pytest.mark.parametrize(
    ("forward", "message"),
    [
        (lambda x: torch.cat([x[:, :3], x[:, :3]]), "returned 10 rows for a batch of 5"),
        (lambda x: x[:1, :3], "returned 1 rows for a batch of 5"),
        (lambda x: x[:, :2], "has 2 values per instance where the spec says 3"),
        (lambda x: x, "has 4 values per instance where the spec says 3"),
    ],
)
def test_an_output_that_disagrees_with_the_batch_or_the_spec_is_no_answer(
    forward: Any, message: str
) -> None:
    handler = make(Linear().eval())
    handler.module = forward
    with pytest.raises(InferenceError, match=re.escape(message)):
        handler(instances(5))


def test_launch_then_complete_is_run_and_a_cpu_model_is_not_pipelined() -> None:
    handler = make(Linear().eval())
    batch = instances(3)
    launched = handler.launch(handler.prepare(batch))
    assert launched.done is None and launched.size == 3  # the CPU: nothing to wait for
    np.testing.assert_array_equal(handler.complete(launched), handler(batch))
    assert not handler.pipelined


def test_a_non_finite_row_is_its_own_error_after_completion() -> None:
    handler = make(Linear().eval())
    handler.module = lambda x: torch.where(x[:, :1] > 100, float("nan"), 1.0).expand(-1, 3)
    batch = [np.zeros(4, np.float32), np.full(4, 1000, np.float32)]
    good, bad = handler.complete(handler.launch(handler.prepare(batch)))
    assert list(good) == [1.0, 1.0, 1.0]
    assert isinstance(bad, InferenceError) and "NaN" in bad.message


def test_outputs_keep_their_shape_on_the_way_to_the_host() -> None:
    Pair = collections.namedtuple("Pair", "a b")
    tensor = torch.ones(2)
    assert runner_module._to_host(tensor) is tensor  # on the host already: no copy
    assert runner_module._to_host({"x": tensor})["x"] is tensor
    assert runner_module._to_host((tensor, [tensor]))[1][0] is tensor
    pair = runner_module._to_host(Pair(tensor, 3))
    assert isinstance(pair, Pair) and pair.b == 3


class FakeStream:
    """Stands in for a CUDA stream: says what waits on it."""

    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self.calls = name, calls

    def wait_event(self, event: object) -> None:
        self.calls.append(f"{self.name} waits for the copy")


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    """torch.cuda's streams and events as recorders, for a runner given FakeStreams: the
    calls made, and the stack of current streams (the tensors stay on the CPU)."""
    calls: list[str] = []
    current: list[str] = ["default"]

    class Event:
        def record(self, stream: FakeStream) -> None:
            calls.append(f"copy recorded on {stream.name}")

        def synchronize(self) -> None:
            calls.append("the output's copy waited for")

    @contextlib.contextmanager
    def on_stream(stream: FakeStream) -> Iterator[None]:
        current.append(stream.name)
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: FakeStream(current[-1], calls))
    monkeypatch.setattr(runner_module, "_used_on", lambda batch, stream: calls.append("kept"))
    return calls, current


def on_fake_streams(runner: Runner, calls: list[str]) -> Runner:
    runner._copy_stream = FakeStream("copy", calls)  # type: ignore[assignment]
    runner._compute_stream = FakeStream("compute", calls)  # type: ignore[assignment]
    return runner


def test_on_cuda_the_copy_and_the_forward_run_on_this_copys_own_streams(
    fake_cuda: tuple[list[str], list[str]],
) -> None:
    calls, current = fake_cuda

    class Spy(Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(f"forward on {current[-1]}")
            return super().forward(x)

    handler = on_fake_streams(make(Spy().eval()), calls)  # as on a CUDA device
    collate = handler.handler.collate

    def spied_collate(items: list[Any]) -> Any:
        calls.append(f"collate on {current[-1]}")
        return collate(items)

    handler.handler.collate = spied_collate  # type: ignore[method-assign]
    rows = handler.run(handler.prepare(instances(2)))
    assert len(rows) == 2
    assert calls == [
        "collate on copy",
        "copy recorded on copy",
        "compute waits for the copy",
        "kept",
        "forward on compute",
        # The output's copy to the host is started on the compute stream, and waited for
        # (by the completion thread, when pipelined) only once it is recorded there.
        "copy recorded on compute",
        "the output's copy waited for",
    ]
    assert handler.pipelined  # a GPU copy: the batcher may complete it on another thread
    handler.settings = handler.settings.model_copy(update={"completion_thread": False})
    assert not handler.pipelined


def test_a_custom_collate_that_leaves_its_batch_on_the_host_keeps_the_copy_overlap(
    fake_cuda: tuple[list[str], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, current = fake_cuda
    moved: list[tuple[str, str]] = []

    def onto(batch: Any, device: torch.device) -> Any:
        moved.append((type(batch).__name__, current[-1]))
        return batch  # the CPU build has no device to copy to

    monkeypatch.setattr(runner_module, "_onto", onto)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    class OwnCollate(Handler):
        def collate(self, items: list[Any]) -> Any:
            return torch.from_numpy(np.stack(items))  # on the host, in pageable memory

    runner = Runner(OwnCollate(spec(), CPU, ModelSettings(path=DEMO), module=Linear().eval()))
    runner.device = torch.device("cuda", 0)  # as for a GPU model; the work stays on the CPU
    on_fake_streams(runner, calls)
    rows = runner.run(runner.prepare(instances(2)))
    # The runner, not the hook, copied the batch over, on the copy stream.
    assert moved == [("Tensor", "copy")]
    assert "compute waits for the copy" in calls
    np.testing.assert_allclose(np.stack(rows), np.stack(make(Linear().eval())(instances(2))))


def test_a_batch_left_on_the_host_goes_over_through_pinned_memory_in_its_own_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pinned: list[tuple[int, ...]] = []

    def pin(self: torch.Tensor) -> torch.Tensor:
        pinned.append(tuple(self.shape))
        return self.clone()  # this CPU build cannot pin; the logic is the same

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    meta = torch.device("meta")  # a device other than the host's, on a CPU-only build
    there = torch.empty(1, device=meta)
    batch = {
        "padded": Padded(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), [(3,), (2,)]),
        "several": [torch.zeros(2), there],
    }
    moved = runner_module._onto(batch, meta)
    padded = moved["padded"]
    assert isinstance(padded, Padded) and padded.lengths == [(3,), (2,)]
    assert padded.values.device == meta and padded.mask.device == meta
    assert padded.mask.dtype == torch.bool
    assert moved["several"][0].device == meta
    assert moved["several"][1] is there  # on a device already: left alone
    assert sorted(pinned) == [(2,), (2, 3), (2, 3)]


def test_each_stage_makes_the_models_gpu_current_in_its_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    selected: list[int] = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: selected[-1] if selected else 0)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    handler = make(Linear().eval())
    handler.device = torch.device("cuda", 1)  # as for a cuda:1 model; the work stays on the CPU
    handler.handler._to_device = lambda tensor, dtype: tensor.to(dtype=dtype)  # type: ignore[method-assign]

    def in_new_thread(work: Callable[[], Any]) -> Any:
        selected.clear()  # a new thread starts on GPU 0
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(work).result()

    prepared = in_new_thread(lambda: handler.prepare(instances(2)))
    assert selected == [1]
    in_new_thread(lambda: handler.run(prepared))
    assert selected == [1]
    handler.run(handler.prepare(instances(2)))
    assert selected == [1]  # already current: not set again


def test_a_batch_is_stacked_straight_into_pinned_host_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    buffers: list[torch.Tensor] = []
    empty = torch.empty

    def pinned_empty(*args: Any, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
        assert pin_memory, "a batch for a GPU goes through pinned memory"
        buffers.append(empty(*args, **kwargs))  # this CPU build cannot pin; the logic is the same
        return buffers[-1]

    def no_second_copy(self: torch.Tensor) -> torch.Tensor:
        raise AssertionError("pinned by a second copy")

    handler = make(Linear().eval())
    handler.handler._pin = True
    monkeypatch.setattr(torch, "empty", pinned_empty)
    monkeypatch.setattr(torch.Tensor, "pin_memory", no_second_copy)
    batch = instances(3)
    collated = handler.handler.collate(batch)
    assert collated.data_ptr() == buffers[0].data_ptr()  # the stack's own memory, not a copy
    assert np.array_equal(collated.numpy(), np.stack(batch))


def test_a_compiled_model_sees_only_warm_up_batch_sizes_and_answers_the_same() -> None:
    sizes: list[int] = []

    class Spy(Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            sizes.append(x.shape[0])
            return super().forward(x)

    # The eager backend keeps the test quick; the padding logic is the same for every backend.
    handler = make(Spy().eval(), compile="default", compile_backend="eager", max_batch_size=8)
    handler.setup()
    assert type(handler.module).__name__ == "OptimizedModule"
    batch = instances(3)
    rows = handler(batch)
    assert len(rows) == 3 and sizes[-1] == 4  # padded up to the bucket, cut back after
    plain = make(Linear().eval())(batch)
    for got, want in zip(rows, plain, strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    handler(instances(8))
    assert sizes[-1] == 8


class NanForNegatives(torch.nn.Module):
    """Sums each row, and answers NaN (or infinity) for a row whose first value is negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.sum(dim=1, keepdim=True).repeat(1, 3)
        out[x[:, 0] < 0, 1] = float("nan")
        out[x[:, 0] < -5, 0] = float("inf")
        return out


@pytest.mark.parametrize("labels", [None, ["a", "b", "c"]])
def test_a_non_finite_output_fails_its_row_and_only_its_row(labels: list[str] | None) -> None:
    handler = make(NanForNegatives(), labels=labels)
    items = [np.array(v, dtype=np.float32) for v in ([1, 1, 1, 1], [-1, 0, 0, 0], [-9, 0, 0, 0])]
    items.append(np.ones(4, dtype=np.float32))
    rows = handler(items)
    assert isinstance(rows[1], InferenceError) and isinstance(rows[2], InferenceError)
    assert "NaN or infinite" in rows[1].message
    assert not isinstance(rows[0], Exception) and not isinstance(rows[3], Exception)


def test_nan_at_padded_positions_of_a_per_position_output_is_not_a_failure() -> None:
    handler = token_handler(output_shape=(-1, 8))
    nan = torch.tensor(float("nan"))
    handler.module = lambda ids, mask: torch.where(mask.unsqueeze(-1), torch.ones(8), nan)
    short, long = handler([np.array([1]), np.array([1, 2, 3])])
    assert short.tolist() == [[1.0] * 8] and len(long) == 3


def served(handler: Runner) -> Runner:
    handler.setup()
    handler.warm_up(handler.settings.warmup_batch_sizes)
    handler.close_compile_gate()
    return handler


def test_a_compiled_model_warmed_in_a_new_thread_has_graph_trees_there() -> None:
    with warnings.catch_warnings():  # inductor's import warns of torch.jit's deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch._inductor import cudagraph_trees as trees

    def old_torch_get_obj(name: str) -> Any:
        # torch 2.11's lookup (no set-up in a new thread): what failed on an H100.
        if hasattr(trees.local, name):
            return getattr(trees.local, name)
        assert torch._C._is_key_in_tls(name), f"{name} missing in this thread"
        return torch._C._get_obj_in_tls(name)

    def in_a_new_thread(warm: bool) -> Any:
        def run() -> Any:
            if warm:
                handler = make(Linear().eval(), compile="default", compile_backend="eager")
                handler.setup()
                handler.warm()
            return old_torch_get_obj("tree_manager_containers"), old_torch_get_obj(
                "tree_manager_locks"
            )

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(run).result()

    with pytest.raises(AssertionError, match="missing in this thread"):
        in_a_new_thread(warm=False)
    first, second = in_a_new_thread(warm=True), in_a_new_thread(warm=True)
    assert first[0] == {} and first[0] is not second[0]  # each worker thread its own trees


@pytest.mark.parametrize(("mode", "calls"), [("default", 1), ("reduce-overhead", 3)])
def test_warm_up_runs_each_graph_until_cuda_graphs_would_replay_it(mode: str, calls: int) -> None:
    handler = make(Linear().eval(), compile=mode, compile_backend="eager", max_batch_size=4)
    handler.setup()
    sizes: list[int] = []
    forward = handler.forward

    def counted(batch: Any) -> Any:
        sizes.append(len(batch))
        return forward(batch)

    handler.forward = counted  # type: ignore[method-assign]
    handler.warm_up(handler.settings.warmup_batch_sizes)
    # After the first check's pair: plain, recorded, replayed under CUDA graph trees.
    counts = {size: sizes[1:].count(size) for size in (1, 2, 4)}
    assert counts == dict.fromkeys((1, 2, 4), calls)


def test_every_batch_size_compiles_at_warm_up_even_past_the_recompile_limit() -> None:
    # Nine sizes (1 to 256) for each of two copies of one module class: past torch's default
    # limit of 8 graphs, which silently ran the largest size eager.
    copies = [
        served(
            make(Linear().eval(), compile="default", compile_backend="eager", max_batch_size=256)
        )
        for _ in range(2)
    ]
    for handler in copies:
        assert handler.graph_gate is not None and handler.graph_gate.graphs == 9
        for size in handler.settings.warmup_batch_sizes:
            assert len(handler(instances(size))) == size
        assert handler.graph_gate.graphs == 9  # serving compiled nothing


def test_every_length_bucket_at_every_batch_size_compiles_at_warm_up() -> None:
    handler = served(
        token_handler(
            compile="default", compile_backend="eager", max_batch_size=4, length_buckets=[4, 8, 16]
        )
    )
    assert handler.graph_gate is not None
    assert handler.graph_gate.graphs == len(handler.graph_shapes()) == 9
    rng = np.random.default_rng(0)
    for size in (1, 3, 4):
        for length in (1, 5, 16):
            handler([rng.integers(0, 50, length) for _ in range(size)])
    assert handler.graph_gate.graphs == 9


def test_a_shape_missed_at_warm_up_fails_loudly_instead_of_compiling_while_serving() -> None:
    handler = served(
        make(Linear().eval(), compile="default", compile_backend="eager", max_batch_size=4)
    )
    unpadded = handler.handler.collate(instances(3))  # 3 is no warm-up size: never sent by prepare
    with pytest.raises(Exception, match="a new graph was needed while serving"):
        handler.forward(unpadded)


def test_compiling_variable_lengths_needs_buckets_up_to_the_longest() -> None:
    with pytest.raises(ModelLoadError, match="length_buckets up to the input's max_shape"):
        token_handler(compile="default", compile_backend="eager", length_buckets=[4, 8]).setup()


@pytest.mark.parametrize(
    ("message", "oom", "fatal"),
    [
        ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True, False),
        ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True, False),
        ("CUDA error: an illegal memory access was encountered", False, True),
        ("CUDA error: device-side assert triggered", False, True),
        ("CUDA error: unspecified launch failure", False, True),
        ("mat1 and mat2 shapes cannot be multiplied", False, False),
    ],
)
def test_library_allocation_failures_are_oom_and_sticky_cuda_errors_are_fatal(
    message: str, oom: bool, fatal: bool
) -> None:
    handler = make(Linear())
    assert handler.is_oom(RuntimeError(message)) is oom
    assert handler.is_fatal(RuntimeError(message)) is fatal


def test_reduced_precision_is_checked_against_the_eager_module_without_new_graphs() -> None:
    handler = make(
        Linear().eval(),
        compile="default",
        compile_backend="eager",
        max_batch_size=4,
        precision="bf16",
    )
    handler.setup()
    handler.warm_up(handler.settings.warmup_batch_sizes)
    assert handler.graph_gate is not None
    warmed = handler.graph_gate.graphs
    assert handler.check_precision(0.05) <= 0.05
    # The fp32 reference ran on the module as loaded, and the bf16 side on a warmed-up size:
    # no graph was added, and none can be while serving.
    assert handler.graph_gate.graphs == warmed
    assert type(handler._eager_module).__name__ == "Linear"
    handler.close_compile_gate()
    assert len(handler(instances(3))) == 3


def test_where_torch_compile_has_no_limit_of_its_own_the_process_limit_is_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import inspect

    def without_isolation(fn: Any) -> inspect.Signature:
        signature = inspect.Signature.from_callable(fn)
        kept = [p for n, p in signature.parameters.items() if n != "isolate_recompiles"]
        return signature.replace(parameters=kept)

    monkeypatch.setattr(compiling_module.inspect, "signature", without_isolation)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    copies = [
        served(
            make(Linear().eval(), compile="default", compile_backend="eager", max_batch_size=256)
        )
        for _ in range(2)
    ]
    assert torch._dynamo.config.recompile_limit >= 2 * 10
    assert all(h.graph_gate is not None and h.graph_gate.graphs == 9 for h in copies)


def test_a_text_input_without_a_tokenising_preprocess_fails_to_load_saying_why() -> None:
    spec = ModelSpec(
        name="text",
        input=TensorSpec(name="text", shape=(), dtype="string"),
        output=TensorSpec(shape=(2,)),
    )
    handler = Runner(Handler(spec, CPU, module=torch.nn.Linear(4, 2)))
    with pytest.raises(ModelLoadError, match="preprocess turns each text into a tensor"):
        handler.warm_up()

    class Lengths(Handler):
        def preprocess(self, instance: Any) -> np.ndarray[Any, Any]:
            return np.full(4, len(str(instance)), dtype=np.float32)

    tokenising = Runner(Lengths(spec, CPU, module=torch.nn.Linear(4, 2)))
    tokenising.warm_up()  # the default collate stacks what preprocess made, in its own dtype
    rows = tokenising([tokenising.preprocess("ab"), tokenising.preprocess("abcd")])
    assert len(rows) == 2 and rows[0].shape == (2,)
