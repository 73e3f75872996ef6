"""The batcher on an emulated accelerator: how busy it keeps the device, with and without the
completion stage, for given launch and kernel costs per batch.

The emulator (tests/emulated.py) holds the GIL for the launch time, then queues the kernel
time on an in-order virtual stream that a wait sleeps on without the GIL. Closed-loop callers
submit through the real MicroBatcher. The device's limit is one batch per max(launch, kernel);
"served / limit" is the batches answered per second against it.

    python scripts/emulated_gpu.py                    # the default scenarios
    python scripts/emulated_gpu.py --launch-ms 1.6 --kernel-ms 1.0
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuserve.core.batcher import MicroBatcher
from tests.emulated import EmulatedModel

# (name, launch ms, kernel ms) a batch. The first is the H100 record's eager encoder at batch
# 128 (1.6 ms to launch, about 1 ms of GPU work); the others are what a cheaper launch
# (CUDA graphs, bf16 weights) would leave: assumed figures, not measured on a GPU.
SCENARIOS = [
    ("eager encoder, batch 128 (H100 record)", 1.6, 1.0),
    ("launch = kernel", 1.0, 1.0),
    ("cheap launch (CUDA graphs, assumed)", 0.3, 1.0),
]


async def measure(launch_s: float, kernel_s: float, pipelined: bool, seconds: float) -> float:
    """Batches answered per second, closed loop, full batches of 8 from 64 callers."""
    model = EmulatedModel(launch_s, kernel_s, pipelined=pipelined)
    batcher: MicroBatcher[int, int] = MicroBatcher(
        model, max_batch_size=8, max_wait_s=0.0, hold_for_callers=False, name="emulated"
    )
    await batcher.start()
    stop_at = time.monotonic() + seconds

    async def caller(index: int) -> None:
        while time.monotonic() < stop_at:
            await batcher.submit(index)

    started = time.monotonic()
    await asyncio.gather(*(caller(i) for i in range(64)))
    elapsed = time.monotonic() - started
    await batcher.stop()
    return model.batches / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launch-ms", type=float)
    parser.add_argument("--kernel-ms", type=float)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    scenarios = SCENARIOS
    if args.launch_ms is not None and args.kernel_ms is not None:
        scenarios = [("given", args.launch_ms, args.kernel_ms)]
    print("| scenario | launch ms | kernel ms | waiting on each batch | completion stage |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, launch_ms, kernel_ms in scenarios:
        limit = 1000.0 / max(launch_ms, kernel_ms)
        launch_s, kernel_s = launch_ms / 1000, kernel_ms / 1000
        synchronous = await measure(launch_s, kernel_s, False, args.seconds) / limit
        pipelined = await measure(launch_s, kernel_s, True, args.seconds) / limit
        print(f"| {name} | {launch_ms:g} | {kernel_ms:g} | {synchronous:.2f} | {pipelined:.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
