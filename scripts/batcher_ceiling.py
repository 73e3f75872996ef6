"""The batcher's own ceiling: items/s through a MicroBatcher whose model does nothing.

    python scripts/batcher_ceiling.py [--seconds 3] [--submitters 256]

256 concurrent tasks submit one item at a time, as the GPU check's section F does, to a
batcher over a worker that returns its items at once, at `max_batch_size` 8, 32 and 128, on
uvloop. What is left is the event loop's work per item (submit, collect, settle, the awaiting
task) and the hand-off per batch: the rate no model can make the batcher exceed on one core.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import uvloop

from gpuserve.core.batcher import MicroBatcher


class Nothing:
    """A model that answers each batch with its own items."""

    def __call__(self, items: list[Any]) -> list[Any]:
        return items


async def ceiling(max_batch_size: int, submitters: int, seconds: float) -> tuple[float, float]:
    """(items/s, CPU µs per item) through the batcher for `seconds`."""
    batcher: MicroBatcher[Any, Any] = MicroBatcher(
        [Nothing()], max_batch_size=max_batch_size, max_wait_s=0.002, name="ceiling"
    )
    await batcher.start()
    done = 0
    deadline = time.monotonic() + seconds

    async def submit() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await batcher.submit(1)
            done += 1

    began, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(submit() for _ in range(submitters)))
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    await batcher.stop()
    return done / elapsed, cpu / done * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--submitters", type=int, default=256)
    args = parser.parse_args()
    for size in (8, 32, 128):
        rate, cpu_us = uvloop.run(ceiling(size, args.submitters, args.seconds))
        print(f"max_batch_size {size}: {rate:,.0f} items/s, {cpu_us:.1f} µs CPU per item")


if __name__ == "__main__":
    main()
