"""Per-model inference statistics in Triton's form, for the protocol's statistics extension.

`Metrics` records into these at the same moments, from the same observations, as into its
Prometheus series, so `/v2/models/stats` and `/metrics` never disagree. Worker processes
share theirs as records, which add up. Triton's semantics: `inference_stats` counts
requests, each accruing its own queue time and the compute time of the batch it ran in (its
longest, if its instances ran in several); `inference_count` counts instances and
`execution_count` batches; each batch size keeps its own count and compute time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class _Duration:
    count: int = 0
    ns: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class ModelStats:
    """One model's counters since the server started."""

    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    by_batch_size: dict[int, _Duration] = field(default_factory=dict)

    # Both run for every request or batch: the additions are written out rather than
    # calls of a helper (tests/test_lane.py counts the calls a request costs).

    def request(
        self, ok: bool, seconds: float, queue_s: float | None = None, compute_s: float = 0.0
    ) -> None:
        """A request to this model was answered: 2xx counts as success, anything else fails.
        A successful one that ran in a batch (`queue_s` not None) adds its queue time and its
        batch's compute time."""
        duration = self.success if ok else self.fail
        duration.count += 1
        duration.ns += int(seconds * 1e9)
        if ok and queue_s is not None:
            self.queue.count += 1
            self.queue.ns += int(queue_s * 1e9)
            self.compute_infer.count += 1
            self.compute_infer.ns += int(compute_s * 1e9)

    def batch(self, size: int, compute_s: float) -> None:
        """A batch of `size` instances ran for `compute_s`."""
        self.inference_count += size
        self.execution_count += 1
        sized = self.by_batch_size.get(size)
        if sized is None:
            sized = self.by_batch_size[size] = _Duration()
        sized.count += 1
        sized.ns += int(compute_s * 1e9)
        self.last_inference_ms = int(time.time() * 1000)

    def to_record(self) -> dict[str, Any]:
        """Every counter, as JSON can carry them: what a worker process shares."""
        return {
            "durations": {
                name: [getattr(self, name).count, getattr(self, name).ns]
                for name in ("success", "fail", "queue", "compute_infer")
            },
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "last_inference_ms": self.last_inference_ms,
            "by_batch_size": {str(k): [d.count, d.ns] for k, d in self.by_batch_size.items()},
        }

    def add(self, record: dict[str, Any]) -> None:
        """Add another process's counters (a `to_record`) to these."""
        for name, (count, ns) in record["durations"].items():
            duration = getattr(self, name)
            duration.count += count
            duration.ns += ns
        self.inference_count += record["inference_count"]
        self.execution_count += record["execution_count"]
        self.last_inference_ms = max(self.last_inference_ms, record["last_inference_ms"])
        for size, (count, ns) in record["by_batch_size"].items():
            sized = self.by_batch_size.setdefault(int(size), _Duration())
            sized.count += count
            sized.ns += ns

    def to_triton(self, name: str, version: str) -> dict[str, Any]:
        """Triton's `model_stats` entry. gpuserve times a batch's run as one (collate,
        forward, split): it is `compute_infer`; `compute_input` and `compute_output` count the
        same requests with no time of their own (tools such as perf_analyzer require the three
        counts to agree)."""
        none = {"count": 0, "ns": 0}
        counted = {"count": self.compute_infer.count, "ns": 0}
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.to_dict(),
                "fail": self.fail.to_dict(),
                "queue": self.queue.to_dict(),
                "compute_input": counted,
                "compute_infer": self.compute_infer.to_dict(),
                "compute_output": counted,
                "cache_hit": none,
                "cache_miss": none,
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": {"count": duration.count, "ns": 0},
                    "compute_infer": duration.to_dict(),
                    "compute_output": {"count": duration.count, "ns": 0},
                }
                for size, duration in sorted(self.by_batch_size.items())
            ],
        }
