"""The demo model with 2 ms of device time a batch, spent with the GIL released, as a GPU's
kernels are: `bench.py --workers ... --gil-free` serves it to show how batches form when
the forward pass leaves the CPU free (on the CPU alone, the passes hold the cores the event
loop needs, and batches grow for that reason instead)."""

from __future__ import annotations

import time
from typing import Any

from gpuserve.handler import Handler

DEVICE_TIME_S = 0.002


class GilFreeDigits(Handler):
    """The digits classifier; each batch waits `DEVICE_TIME_S` without the GIL."""

    def forward(self, batch: Any) -> Any:
        time.sleep(DEVICE_TIME_S)
        return super().forward(batch)
