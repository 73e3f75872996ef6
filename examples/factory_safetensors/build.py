"""Weights for `factory_model.build`, saved as safetensors (no pickle, no code in the file).

python examples/factory_safetensors/build.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from factory_model import build as build_module  # noqa: E402


def build(out: Path) -> Path:
    torch.manual_seed(2)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scorer.safetensors"
    save_file(build_module(features=16, hidden=32).state_dict(), str(path))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE / "artifacts")
    print(build(parser.parse_args().out))
