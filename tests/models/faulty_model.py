"""A model that misbehaves on command, for the fault and chaos tests (factory form).

The first feature of an instance picks what happens to the batch that holds it:
13 raises a BaseException subclass, 14 raises StopIteration, 15 returns NaN for that row,
21 hangs (until the process goes), 22 sleeps half a second; anything else is summed.
"""

from __future__ import annotations

import threading

import torch

POISON, STOP, NAN, HANG, SLOW = 13.0, 14.0, 15.0, 21.0, 22.0
_never = threading.Event()


class Poison(BaseException):
    """Not an Exception: escapes every `except Exception` on its way up."""


class Faulty(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x[:, 0]
        if bool((first == POISON).any()):
            raise Poison("poison input")
        if bool((first == STOP).any()):
            raise StopIteration("a model that raised StopIteration")
        if bool((first == HANG).any()):
            _never.wait(600)
        if bool((first == SLOW).any()):
            threading.Event().wait(0.5)
        out = x.sum(dim=1, keepdim=True)
        return torch.where((first == NAN).unsqueeze(1), torch.nan, out)


def build() -> torch.nn.Module:
    return Faulty()
