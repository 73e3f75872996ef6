"""A small CNN over 8x8 single-channel images, saved as TorchScript (`torch.jit.save`).

python examples/torchscript_image/build.py [--out DIR]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

from gpuserve.spec import ModelSpec, TensorSpec

HERE = Path(__file__).resolve().parent


class TinyCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.head = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv(images / 16.0)), 2)
        return self.head(x.flatten(1))


def build(out: Path) -> Path:
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cnn.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated in torch
        torch.jit.save(torch.jit.script(TinyCNN().eval()), str(path))
    ModelSpec(
        name="cnn",
        input=TensorSpec(name="image", shape=(1, 8, 8), min=0, max=16),
        output=TensorSpec(name="logits", shape=(10,)),
        labels=[str(digit) for digit in range(10)],
    ).to_file(path.with_suffix(".json"))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE / "artifacts")
    print(build(parser.parse_args().out))
