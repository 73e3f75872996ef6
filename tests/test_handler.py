"""The default handler hooks: collate, forward, split and postprocess on an eager module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpuserve.errors import ModelLoadError
from gpuserve.handler import Handler, choose_batch_size
from gpuserve.spec import ModelSpec, TensorSpec

from .conftest import CPU


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def spec(labels: list[str] | None = None) -> ModelSpec:
    return ModelSpec(
        name="lin", input=TensorSpec(shape=(4,)), output=TensorSpec(shape=(3,)), labels=labels
    )


def instances(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(4).astype(np.float32) for _ in range(n)]


def test_a_batch_gives_the_same_rows_as_each_instance_alone() -> None:
    handler = Handler(Linear().eval(), spec(), CPU)
    batch = instances(5)
    together = handler(batch)
    alone = [handler([x])[0] for x in batch]
    assert len(together) == 5
    for a, b in zip(together, alone, strict=True):
        assert a == pytest.approx(b, abs=1e-6)


def test_collate_stacks_on_the_device_in_the_spec_dtype() -> None:
    handler = Handler(Linear(), spec(), CPU)
    batch = handler.collate(instances(3))
    assert batch.shape == (3, 4) and batch.dtype == torch.float32 and batch.device.type == "cpu"


def test_a_labelled_model_returns_label_and_probabilities() -> None:
    handler = Handler(Linear().eval(), spec(["cat", "dog", "eel"]), CPU)
    x = instances(1)
    (result,) = handler(x)
    logits = Linear()(torch.from_numpy(x[0])).detach()
    assert result["label"] == ["cat", "dog", "eel"][int(logits.argmax())]
    assert sum(result["probabilities"]) == pytest.approx(1.0, abs=1e-6)


def test_an_unlabelled_model_returns_raw_rows() -> None:
    handler = Handler(Linear().eval(), spec(), CPU)
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

    Handler(Spy(), spec(), CPU)(instances(1))
    assert seen == [True]


def test_warm_up_runs_the_whole_path() -> None:
    calls: list[int] = []

    class Counting(Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape[0])
            return super().forward(x)

    Handler(Counting(), spec(), CPU).warm_up((1, 4, 32))
    assert calls == [2, 1, 4, 32]  # the shape check, then each batch size once


def test_bf16_runs_under_autocast_and_stays_close_to_fp32() -> None:
    handler = Handler(Linear().eval(), spec(), CPU, precision="bf16")
    with torch.inference_mode():
        out = handler.forward(handler.collate(instances(4)))
    assert out.dtype == torch.bfloat16
    error = handler.check_precision(tolerance=0.05)
    assert 0 < error < 0.05


def test_a_precision_outside_the_tolerance_fails_the_load() -> None:
    handler = Handler(Linear().eval(), spec(), CPU, precision="bf16")
    with pytest.raises(ModelLoadError, match=r"bf16 output differs from fp32"):
        handler.check_precision(tolerance=1e-9)


def test_fp32_has_nothing_to_check() -> None:
    handler = Handler(Linear().eval(), spec(), CPU)
    with torch.inference_mode():
        assert handler.forward(handler.collate(instances(1))).dtype == torch.float32
    assert handler.check_precision(tolerance=1e-9) == 0.0


def test_out_of_memory_errors_are_recognised() -> None:
    handler = Handler(Linear(), spec(), CPU)
    assert handler.is_oom(MemoryError())
    assert handler.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not handler.is_oom(RuntimeError("shape mismatch"))


@pytest.mark.parametrize(
    ("rates", "chosen"),
    [
        ({1: 100.0, 2: 180.0, 4: 200.0, 8: 198.0, 16: 150.0}, 4),  # a CPU: peaks, then falls
        ({1: 10.0, 2: 20.0, 4: 40.0, 8: 80.0}, 8),  # a GPU: grows with the batch
        ({1: 100.0, 2: 99.0, 4: 97.0}, 1),  # flat: the smallest costs no throughput
    ],
)
def test_the_chosen_batch_size_is_the_smallest_near_the_best(
    rates: dict[int, float], chosen: int
) -> None:
    assert choose_batch_size(rates) == chosen


def test_measuring_batch_sizes_runs_each_size() -> None:
    rates = Handler(Linear().eval(), spec(), CPU).measure_batch_sizes((1, 2, 4), rounds=2)
    assert set(rates) == {1, 2, 4} and all(rate > 0 for rate in rates.values())
