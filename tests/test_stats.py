"""The protocol's statistics: each request and batch adds up as Triton's semantics say."""

from __future__ import annotations

import json

from gpuserve.core.stats import ModelStats


def test_requests_and_batches_add_up_in_triton_s_form() -> None:
    stats = ModelStats()
    stats.batch(3, compute_s=0.010)
    stats.batch(1, compute_s=0.004)
    stats.batch(3, compute_s=0.006)
    # Two requests ran (their queue time, their batch's compute time); one failed.
    stats.request(True, 0.02, queue_s=0.003, compute_s=0.010)
    stats.request(True, 0.03, queue_s=0.001, compute_s=0.004)
    stats.request(False, 0.001, queue_s=0.0, compute_s=0.006)
    body = stats.to_triton("m", "1")
    assert body["name"] == "m" and body["version"] == "1"
    assert body["inference_count"] == 7 and body["execution_count"] == 3
    assert body["last_inference"] > 1_700_000_000_000  # milliseconds since the epoch
    inference = body["inference_stats"]
    assert inference["success"] == {"count": 2, "ns": 50_000_000}
    assert inference["fail"] == {"count": 1, "ns": 1_000_000}
    # Requests, not instances: each successful one accrues its batch's compute time once.
    assert inference["queue"] == {"count": 2, "ns": 4_000_000}
    assert inference["compute_infer"] == {"count": 2, "ns": 14_000_000}
    # The same count on all three compute durations (perf_analyzer refuses them otherwise).
    assert inference["compute_input"] == {"count": 2, "ns": 0}
    assert inference["compute_output"] == {"count": 2, "ns": 0}
    sizes = {entry["batch_size"]: entry["compute_infer"] for entry in body["batch_stats"]}
    assert sizes == {1: {"count": 1, "ns": 4_000_000}, 3: {"count": 2, "ns": 16_000_000}}
    assert [entry["batch_size"] for entry in body["batch_stats"]] == [1, 3]


def test_two_processes_records_add_up_to_one_server_s() -> None:
    first, second, both = ModelStats(), ModelStats(), ModelStats()
    for stats, sizes in ((first, (3, 1)), (second, (3, 5))):
        for size in sizes:
            stats.batch(size, compute_s=0.002)
            both.batch(size, compute_s=0.002)
            stats.request(size != 5, 0.01, queue_s=0.001 * size, compute_s=0.002)
            both.request(size != 5, 0.01, queue_s=0.001 * size, compute_s=0.002)
    summed = ModelStats()
    summed.add(json.loads(json.dumps(first.to_record())))  # as the file carries it
    summed.add(json.loads(json.dumps(second.to_record())))
    assert summed.to_triton("m", "1") == both.to_triton("m", "1") | {
        "last_inference": max(first.last_inference_ms, second.last_inference_ms)
    }
    assert summed.inference_count == 12 and summed.by_batch_size[3].count == 2
