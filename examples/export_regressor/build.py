"""A regressor exported with `torch.export`, its batch dimension dynamic.

python examples/export_regressor/build.py [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def build(out: Path) -> Path:
    torch.manual_seed(1)
    out.mkdir(parents=True, exist_ok=True)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(module.eval(), (torch.zeros(2, 8),), dynamic_shapes=({0: batch},))
    path = out / "regressor.pt2"
    torch.export.save(program, str(path))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE / "artifacts")
    print(build(parser.parse_args().out))
