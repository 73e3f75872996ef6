"""Prometheus collectors, one registry per app so that several apps (tests) never collide."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import orjson
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

from gpuserve.core.stats import ModelStats
from gpuserve.model.device import GpuMonitor, GpuSample

logger = logging.getLogger("gpuserve.core.metrics")

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_MODEL = ["model", "version"]
_STATS_PREFIX = "protocol_stats_"  # a worker's statistics, beside prometheus-client's files
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Spans(Protocol):
    """Where the spans of calls and batches go, when traces are on (`core.tracing.Tracing`)."""

    def call(
        self,
        record: Any,
        protocol: str,
        method: str,
        route: str,
        status: int | str,
        seconds: float,
    ) -> None: ...

    def batch(self, model: str, version: str, device: str, stats: Any) -> object: ...

    def close(self) -> None: ...


class Metrics:
    """The server's metrics. Names follow Prometheus conventions (`_seconds`, `_total`).

    With `multiprocess_dir` (a worker among several), every value lives in files there, as
    prometheus-client's multiprocess mode has it, and `render` sums every worker's: counters
    and histograms add up, gauges add up or take the lowest (readiness) over live workers.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self._multiprocess_dir = multiprocess_dir
        # Spans, where traces are on (set while the server starts): the calls' and batches'.
        self.traces: Spans | None = None
        if multiprocess_dir is None:
            # process_*: this process's memory, CPU time, open files and start time.
            ProcessCollector(registry=self.registry)
        # Read when scraped; in multiprocess mode copied into the shared files by `refresh`.
        self._readers: dict[tuple[str, str], tuple[Any, Callable[[], float]]] = {}
        self._request_children: dict[tuple[str, int | str, str, str, str], tuple[Any, Any]] = {}
        self._stats: dict[tuple[str, str], ModelStats] = {}
        self._batch_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self.requests = Counter(
            "gpuserve_requests",
            "Requests answered, by protocol (http or grpc), route (gRPC: the method), status "
            "(HTTP's code, gRPC's status name), model and version (empty: no model).",
            ["protocol", "route", "code", "model", "version"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "gpuserve_request_seconds",
            "Time from request to response, by protocol, route, model and version.",
            ["protocol", "route", "model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "gpuserve_batch_size",
            "Instances per forward pass.",
            _MODEL,
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "gpuserve_queue_wait_seconds",
            "Time the oldest instance of a batch waited before its forward pass began.",
            _MODEL,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.forward_seconds = Histogram(
            "gpuserve_forward_seconds",
            "Time of one batch through collate, forward and split.",
            _MODEL,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.failed_items = Counter(
            "gpuserve_failed_items",
            "Instances whose forward pass raised, after retrying their batch in halves.",
            _MODEL,
            registry=self.registry,
        )
        self.oom_splits = Counter(
            "gpuserve_oom_splits",
            "Batches split and retried after running out of memory.",
            _MODEL,
            registry=self.registry,
        )
        self.refused = Counter(
            "gpuserve_refused",
            "Requests refused because the queue was full.",
            _MODEL,
            registry=self.registry,
        )
        self.timed_out = Counter(
            "gpuserve_timed_out",
            "Requests answered 504 because their deadline passed.",
            _MODEL,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "gpuserve_queue_depth",
            "Instances waiting for a batch.",
            _MODEL,
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.in_flight = Gauge(
            "gpuserve_requests_in_flight",
            "Requests (HTTP and gRPC) received and not yet answered.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.ready = Gauge(
            "gpuserve_ready",
            "1 when the model is loaded, warmed up and accepting requests (in every worker).",
            _MODEL,
            registry=self.registry,
            multiprocess_mode="livemin",
        )

        # `gpu` is the CUDA index the server uses (cuda:N), `uuid` the GPU's own.
        gpu = ["gpu", "name", "uuid"]
        self.gpu_utilization = Gauge(
            "gpuserve_gpu_utilization_ratio",
            "Share of the last NVML sample period a kernel ran on the GPU (0-1).",
            gpu,
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.gpu_memory_used = Gauge(
            "gpuserve_gpu_memory_used_bytes",
            "GPU memory in use, by every process.",
            gpu,
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.gpu_memory_free = Gauge(
            "gpuserve_gpu_memory_free_bytes",
            "GPU memory a process could still allocate (NVML's free, net of the driver's reserve).",
            gpu,
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.gpu_memory_total = Gauge(
            "gpuserve_gpu_memory_total_bytes",
            "GPU memory in all.",
            gpu,
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.gpu_temperature = Gauge(
            "gpuserve_gpu_temperature_celsius",
            "GPU temperature.",
            gpu,
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.gpu_power = Gauge(
            "gpuserve_gpu_power_watts",
            "GPU power draw.",
            gpu,
            registry=self.registry,
            multiprocess_mode="livemax",
        )

    def observe_gpus(self, samples: list[GpuSample]) -> None:
        """Set each GPU's gauges; a reading the GPU does not give stays absent."""
        for sample in samples:
            labels = (str(sample.index), sample.name, sample.uuid or "")
            for gauge, value in (
                (self.gpu_utilization, sample.utilization),
                (self.gpu_memory_used, sample.memory_used_bytes),
                (self.gpu_memory_free, sample.memory_free_bytes),
                (self.gpu_memory_total, sample.memory_total_bytes),
                (self.gpu_temperature, sample.temperature_celsius),
                (self.gpu_power, sample.power_watts),
            ):
                if value is not None:
                    gauge.labels(*labels).set(value)

    def track_queue_depth(self, model: str, version: str, read: Callable[[], float]) -> None:
        """Read the depth when scraped, so nothing polls between scrapes (a worker among
        several copies it at each `refresh` and scrape)."""
        child = self.queue_depth.labels(model, version)
        if self._multiprocess_dir is None:
            child.set_function(read)
        else:
            self._readers[(model, version)] = (child, read)  # a reloaded copy replaces its own

    def refresh(self) -> None:
        """Copy the values read at scrape time, and the protocol's statistics, into the
        shared files (multiprocess mode), where the other workers see them."""
        for child, read in self._readers.values():
            child.set(read())
        if self._multiprocess_dir is not None:
            # A copy first: a batch of another model may add its entry from a worker thread.
            records = [[*key, stats.to_record()] for key, stats in list(self._stats.items())]
            folder = Path(self._multiprocess_dir)
            mine = folder / f"{_STATS_PREFIX}{os.getpid()}.json"
            partial = mine.with_suffix(".part")
            partial.write_bytes(orjson.dumps(records))
            partial.replace(mine)  # readers never see half a file

    def summed_stats(self, keys: list[tuple[str, str]]) -> list[ModelStats]:
        """Each (model, version)'s statistics for the whole server: this process's, plus (in
        multiprocess mode) every other worker's, dead ones included (their requests were
        served), as they shared them at most 0.1 s ago. The files are read once for all."""
        if self._multiprocess_dir is None:
            return [self.stats(model, version) for model, version in keys]
        self.refresh()
        totals = {key: ModelStats() for key in keys}
        for path in Path(self._multiprocess_dir).glob(f"{_STATS_PREFIX}*.json"):
            for name, version, record in orjson.loads(path.read_bytes()):
                total = totals.get((name, version))
                if total is not None:
                    total.add(record)
        # By key, not the dict's values: a key asked for twice still gets one entry each.
        return [totals[key] for key in keys]

    def observe_request(
        self,
        route: str,
        code: int | str,
        seconds: float,
        model: str = "",
        protocol: str = "http",
        version: str = "",
        queue_s: float | None = None,
        compute_s: float = 0.0,
    ) -> None:
        """One answered request: an HTTP status code, or a gRPC status name ("OK", ...); with
        `queue_s`, it ran in a batch: its queue time and its batch's compute time."""
        # The labelled children, found once per (route, code, model, version): prometheus-
        # client's labels() checks and joins its arguments under a lock on every call.
        key = (route, code, model, protocol, version)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(protocol, route, str(code), model, version),
                self.request_seconds.labels(protocol, route, model, version),
            )
            self._request_children[key] = children
        counter, histogram = children
        counter.inc()
        histogram.observe(seconds)
        if model:  # a request that reached a model: the protocol's statistics count it too
            stats = self._stats.get((model, version)) or self.stats(model, version)
            succeeded = code == "OK" if isinstance(code, str) else 200 <= code < 300
            stats.request(succeeded, seconds, queue_s, compute_s)

    def observe_batch(
        self,
        model: str,
        version: str,
        size: int,
        queue_wait_s: float,
        forward_s: float,
        failed_items: int,
        oom_splits: int,
        queue_wait_total_s: float = 0.0,
    ) -> None:
        stats = self._stats.get((model, version)) or self.stats(model, version)
        stats.batch(size, forward_s)
        # The labelled children found once per model version, as for requests.
        children = self._batch_children.get((model, version))
        if children is None:
            children = self._batch_children[(model, version)] = (
                self.batch_size.labels(model, version),
                self.queue_wait_seconds.labels(model, version),
                self.forward_seconds.labels(model, version),
            )
        batch_size, queue_wait, forward = children
        batch_size.observe(size)
        queue_wait.observe(queue_wait_s)
        forward.observe(forward_s)
        if failed_items:
            self.failed_items.labels(model, version).inc(failed_items)
        if oom_splits:
            self.oom_splits.labels(model, version).inc(oom_splits)

    def stats(self, model: str, version: str) -> ModelStats:
        """A model version's counters in the protocol's form, kept beside its Prometheus
        series."""
        key = (model, version)
        found = self._stats.get(key)
        if found is None:
            found = self._stats[key] = ModelStats()
        return found

    def render(self) -> bytes:
        """The Prometheus text: this process's metrics, or every worker's summed."""
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        self.refresh()
        summed = CollectorRegistry()
        multiprocess.MultiProcessCollector(summed, self._multiprocess_dir)
        summed.register(_ProcessTotals(self._worker_pids))
        return generate_latest(summed)

    def _worker_pids(self) -> list[int]:
        """The live workers: each shares its statistics in a file named by its PID."""
        assert self._multiprocess_dir is not None
        pids = []
        for path in Path(self._multiprocess_dir).glob(f"{_STATS_PREFIX}*.json"):
            pid = path.stem.removeprefix(_STATS_PREFIX)
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                pids.append(int(pid))
        return sorted(pids)


def _pid_of(pid: int) -> Callable[[], int]:
    return lambda: pid


class _ProcessTotals:
    """process_* for a server of several worker processes: every live worker's memory, CPU
    time and open files summed, and the earliest start (Prometheus' process collector reads
    one process)."""

    _EARLIEST = frozenset({"process_start_time_seconds", "process_max_fds"})

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids

    def collect(self) -> Iterator[Metric]:
        totals: dict[str, Metric] = {}
        for pid in self._pids():
            reader = ProcessCollector(pid=_pid_of(pid), registry=None)
            for family in reader.collect():
                total = totals.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    if not total.samples:
                        total.add_sample(sample.name, sample.labels, sample.value)
                        continue
                    kept = total.samples[0]
                    if family.name in self._EARLIEST:
                        value = min(kept.value, sample.value)
                    else:
                        value = kept.value + sample.value
                    total.samples[0] = kept._replace(value=value)
        yield from totals.values()


async def sample_gpus(metrics: Metrics, monitor: GpuMonitor, interval_s: float) -> None:
    """Refresh the GPU gauges every `interval_s` until cancelled. NVML reads run off the loop."""
    while True:
        try:
            metrics.observe_gpus(await asyncio.to_thread(monitor.sample))
        except Exception:  # a flaky reading must not end the sampling, nor the server
            logger.exception("reading the GPU gauges failed")
        await asyncio.sleep(interval_s)
