"""User code: the module's class and a factory for it. gpuserve imports `build` and loads the
weights into what it returns."""

from __future__ import annotations

import torch


class Scorer(torch.nn.Module):
    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(features, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def build(features: int = 16, hidden: int = 32) -> torch.nn.Module:
    return Scorer(features, hidden)
