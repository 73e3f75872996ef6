"""Train the demo model: a small MLP on scikit-learn's bundled 8x8 digits (no download).

Writes `<out>/digits.pt2` (a torch.export program with a dynamic batch dimension) and
`<out>/digits.json` (its spec), and prints the held-out accuracy. Seeded: the same on every run.

    python scripts/make_demo_model.py --out models
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from gpuserve.spec import ModelSpec, TensorSpec

SEED = 0
MAX_BATCH = 4096


class DigitsNet(torch.nn.Module):
    """64 pixel values (0-16) in, 10 logits out. Scaling is inside, so clients send raw pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(64, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 64),
            torch.nn.ReLU(),
            torch.nn.Linear(64, 10),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels / 16.0)


def train(epochs: int = 300) -> tuple[DigitsNet, float]:
    torch.manual_seed(SEED)
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data.astype(np.float32),
        digits.target.astype(np.int64),
        test_size=0.2,
        random_state=SEED,
        stratify=digits.target,
    )
    model = DigitsNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    xs, ys = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(epochs // 10):
        for _ in range(10):
            order = torch.randperm(len(xs), generator=generator)
            for start in range(0, len(xs), 128):
                idx = order[start : start + 128]
                optimiser.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
                loss.backward()
                optimiser.step()
    model.eval()
    with torch.inference_mode():
        predicted = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    return model, float((predicted == y_test).mean())


def save(model: DigitsNet, out: Path, accuracy: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(
        model, (torch.zeros(2, 64),), dynamic_shapes=({0: batch},), strict=False
    )
    torch.export.save(program, str(out / "digits.pt2"))
    spec = ModelSpec(
        name="digits",
        input=TensorSpec(name="pixels", shape=(64,), dtype="float32", min=0, max=16),
        output=TensorSpec(name="logits", shape=(10,), dtype="float32"),
        labels=[str(i) for i in range(10)],
        description=f"MLP on sklearn's 8x8 digits; held-out accuracy {accuracy:.4f}",
    )
    spec.to_file(out / "digits.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--epochs", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)  # deterministic and fast for a model this small
    model, accuracy = train(args.epochs)
    save(model, args.out, accuracy)
    print(json.dumps({"model": str(args.out / "digits.pt2"), "held_out_accuracy": accuracy}))


if __name__ == "__main__":
    main()
