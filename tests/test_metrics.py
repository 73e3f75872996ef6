"""Metrics: names, labels and the per-app registry."""

from __future__ import annotations

from gpuserve.metrics import Metrics


def test_each_instance_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.observe_request("/predict", 200, 0.01)
    assert b'gpuserve_requests_total{code="200",route="/predict"} 1.0' in first.render()
    assert b"gpuserve_requests_total{" not in second.render()


def test_batches_feed_size_wait_forward_and_failures() -> None:
    metrics = Metrics()
    metrics.observe_batch(
        "m", size=5, queue_wait_s=0.002, forward_s=0.004, failed_items=0, oom_splits=0
    )
    metrics.observe_batch(
        "m", size=1, queue_wait_s=0.0, forward_s=0.001, failed_items=1, oom_splits=2
    )
    text = metrics.render().decode()
    assert 'gpuserve_batch_size_bucket{le="4.0",model="m"} 1.0' in text
    assert 'gpuserve_batch_size_bucket{le="8.0",model="m"} 2.0' in text
    assert 'gpuserve_batch_size_sum{model="m"} 6.0' in text
    assert 'gpuserve_forward_seconds_count{model="m"} 2.0' in text
    assert 'gpuserve_queue_wait_seconds_count{model="m"} 2.0' in text
    assert 'gpuserve_failed_items_total{model="m"} 1.0' in text
    assert 'gpuserve_oom_splits_total{model="m"} 2.0' in text


def test_queue_depth_is_read_at_scrape_time() -> None:
    metrics = Metrics()
    depth = [3]
    metrics.track_queue_depth("m", lambda: depth[0])
    assert b'gpuserve_queue_depth{model="m"} 3.0' in metrics.render()
    depth[0] = 7
    assert b'gpuserve_queue_depth{model="m"} 7.0' in metrics.render()
