"""Metrics: names, labels and the per-app registry."""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest

from gpuserve.core.metrics import Metrics, sample_gpus
from gpuserve.model.device import GpuSample


def test_each_instance_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.observe_request("/predict", 200, 0.01)
    assert (
        b'gpuserve_requests_total{code="200",model="",'
        b'protocol="http",route="/predict",version=""} 1.0' in first.render()
    )
    assert b"gpuserve_requests_total{" not in second.render()


def test_the_process_s_own_series_are_exported() -> None:
    """Memory, CPU time, open files and start time, as Prometheus' process collector names
    them (Linux: read from /proc)."""
    text = Metrics().render().decode()
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("process_")
    }
    assert values["process_resident_memory_bytes"] > 2**20
    assert values["process_cpu_seconds_total"] > 0
    assert values["process_open_fds"] >= 3
    assert 0 < values["process_start_time_seconds"] <= time.time()


def test_each_version_of_a_model_has_its_own_series_and_statistics() -> None:
    metrics = Metrics()
    for version, size in (("1", 3), ("2", 5), ("2", 1)):
        metrics.observe_batch(
            version=version,
            model="m",
            size=size,
            queue_wait_s=0.0,
            forward_s=0.001,
            failed_items=0,
            oom_splits=0,
        )
        metrics.observe_request("/v2/models/{name}/infer", 200, 0.01, "m", "http", version)
    text = metrics.render().decode()
    assert 'gpuserve_batch_size_sum{model="m",version="1"} 3.0' in text
    assert 'gpuserve_batch_size_sum{model="m",version="2"} 6.0' in text
    assert (metrics.stats("m", "1").inference_count, metrics.stats("m", "2").inference_count) == (
        3,
        6,
    )


def test_batches_feed_size_wait_forward_and_failures() -> None:
    metrics = Metrics()
    metrics.observe_batch(
        "m", "1", size=5, queue_wait_s=0.002, forward_s=0.004, failed_items=0, oom_splits=0
    )
    metrics.observe_batch(
        "m", "1", size=1, queue_wait_s=0.0, forward_s=0.001, failed_items=1, oom_splits=2
    )
    text = metrics.render().decode()
    assert 'gpuserve_batch_size_bucket{le="4.0",model="m",version="1"} 1.0' in text
    assert 'gpuserve_batch_size_bucket{le="8.0",model="m",version="1"} 2.0' in text
    assert 'gpuserve_batch_size_sum{model="m",version="1"} 6.0' in text
    assert 'gpuserve_forward_seconds_count{model="m",version="1"} 2.0' in text
    assert 'gpuserve_queue_wait_seconds_count{model="m",version="1"} 2.0' in text
    assert 'gpuserve_failed_items_total{model="m",version="1"} 1.0' in text
    assert 'gpuserve_oom_splits_total{model="m",version="1"} 2.0' in text


def test_queue_depth_is_read_at_scrape_time() -> None:
    metrics = Metrics()
    depth = [3]
    metrics.track_queue_depth("m", "1", lambda: depth[0])
    assert b'gpuserve_queue_depth{model="m",version="1"} 3.0' in metrics.render()
    depth[0] = 7
    assert b'gpuserve_queue_depth{model="m",version="1"} 7.0' in metrics.render()


def gpu(index: int, power: float | None) -> GpuSample:
    return GpuSample(
        index, "Fake H100", 0.5, 10 * 2**30, 80 * 2**30, 60.0, power, f"u{index}", 69 * 2**30
    )


def test_gpu_gauges_are_set_per_gpu_and_absent_where_unread() -> None:
    metrics = Metrics()
    assert "gpuserve_gpu_utilization_ratio{" not in metrics.render().decode()  # none yet
    metrics.observe_gpus([gpu(0, 300.0), gpu(1, None)])
    text = metrics.render().decode()
    # `gpu` is the CUDA index the server uses; `uuid` names the physical GPU.
    assert 'gpuserve_gpu_utilization_ratio{gpu="0",name="Fake H100",uuid="u0"} 0.5' in text
    assert (
        'gpuserve_gpu_memory_total_bytes{gpu="1",name="Fake H100",uuid="u1"} 8.589934592e+10'
        in text
    )
    assert 'gpuserve_gpu_power_watts{gpu="0",name="Fake H100",uuid="u0"} 300.0' in text
    free = 'gpuserve_gpu_memory_free_bytes{gpu="0",name="Fake H100",uuid="u0"} 7.4088185856e+10'
    assert free in text
    assert 'gpuserve_gpu_power_watts{gpu="1"' not in text  # absent, not zero


@pytest.mark.anyio
async def test_the_sampler_refreshes_the_gauges_until_cancelled() -> None:
    metrics = Metrics()
    readings = iter(range(1000))

    class Monitor:
        def sample(self) -> list[GpuSample]:
            return [GpuSample(0, "g", next(readings) / 1000, None, None, None, None)]

    task = asyncio.create_task(sample_gpus(metrics, Monitor(), 0.001))  # type: ignore[arg-type]
    with anyio.fail_after(10):
        while metrics.gpu_utilization.labels("0", "g", "")._value.get() < 0.003:
            await asyncio.sleep(0.001)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
