"""The completion stage, on an emulated accelerator: a worker that launches a batch does not
wait for its output; another thread does, and resolves the batch, so the device is fed while
earlier batches finish. Structure is asserted (synchronisations per thread, batches in
flight, the busy share against the synchronous path's ceiling in the same run), not time."""

from __future__ import annotations

import asyncio

import pytest

from gpuserve.core.batcher import MicroBatcher

from .emulated import EmulatedModel

pytestmark = pytest.mark.anyio

# Large against scheduler jitter: 4 ms of launch with the GIL held, 4 ms of kernel.
LAUNCH_S = 0.004
KERNEL_S = 0.004
CALLERS = 16
BATCH = 4
ROUNDS = 12


async def drive(model: EmulatedModel) -> float:
    """Closed-loop callers, each sending its next item once answered; the device's busy share
    over the run."""
    batcher: MicroBatcher[int, int] = MicroBatcher(
        model, max_batch_size=BATCH, max_wait_s=0.0, hold_for_callers=False, name="emulated"
    )
    await batcher.start()
    loop = asyncio.get_running_loop()

    async def caller(index: int) -> None:
        for round_ in range(ROUNDS):
            value = index * 1000 + round_
            assert await batcher.submit(value) == value * 2

    try:
        started = loop.time()
        await asyncio.gather(*(caller(i) for i in range(CALLERS)))
        elapsed = loop.time() - started
    finally:
        await batcher.stop()
    return model.stream.busy_s / elapsed


async def test_the_completion_stage_keeps_the_device_busier_than_the_synchronous_ceiling() -> (
    None
):
    synchronous = EmulatedModel(LAUNCH_S, KERNEL_S, pipelined=False)
    pipelined = EmulatedModel(LAUNCH_S, KERNEL_S, pipelined=True)
    busy_sync = await drive(synchronous)
    busy_pipe = await drive(pipelined)
    ceiling = KERNEL_S / (LAUNCH_S + KERNEL_S)  # 0.5: what waiting on each batch allows
    # The synchronous path cannot pass its ceiling (a little slack for rounding only).
    assert busy_sync <= ceiling * 1.05, busy_sync
    # The completion stage must clear it by a wide margin, not by noise.
    assert busy_pipe >= ceiling * 1.3, (busy_pipe, busy_sync)
    assert busy_pipe >= busy_sync * 1.3, (busy_pipe, busy_sync)


async def test_the_launching_thread_never_waits_for_an_output() -> None:
    model = EmulatedModel(LAUNCH_S, KERNEL_S, pipelined=True)
    await drive(model)
    (launcher,) = model.launchers
    assert model.syncs.get(launcher, 0) == 0, model.syncs
    # Every batch was waited for once, by the completion thread.
    assert sum(model.syncs.values()) == model.batches
    # The device had more than one batch queued at a time.
    assert model.most_in_flight >= 2


async def test_the_synchronous_path_waits_once_per_batch_on_the_launching_thread() -> None:
    model = EmulatedModel(LAUNCH_S, KERNEL_S, pipelined=False)
    await drive(model)
    (launcher,) = model.launchers
    assert model.syncs == {launcher: model.batches}
    assert model.most_in_flight == 1
