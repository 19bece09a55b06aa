"""Prometheus metrics on an injected registry: histograms in base units, low-cardinality labels.

With several worker processes (`--workers`), prometheus-client's multiprocess mode is on (the
supervisor sets PROMETHEUS_MULTIPROC_DIR before the workers start): each worker writes its values to
files there, and whichever worker answers /metrics sums them. Each gauge says how it combines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

PREFIX = "resnet_serve"
ROUTES = ("predict", "predictions", "v2")
# request_failed: dropped because another image of the same request failed; cancelled: its request
# was cancelled (the server stopped waiting for it at shutdown).
REJECT_REASONS = ("queue_full", "deadline", "disconnected", "bad_input", "too_large", "request_failed", "cancelled")
# Every status a model route can answer, created up front so that the first error of a kind is an
# increase that rate() sees, not the birth of a series that it misses.
STATUS_CODES = ("200", "400", "404", "408", "413", "415", "429", "499", "500", "503", "504", "507")

# End-to-end latency on a CPU runs to seconds under load; on a GPU it is milliseconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    buckets = [1]
    while buckets[-1] < max_batch_size:
        buckets.append(buckets[-1] * 2)
    return tuple(float(b) for b in buckets)


MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self, registry: CollectorRegistry, *, max_batch_size: int) -> None:
        self.registry = registry
        self._multiprocess_dir = os.environ.get(MULTIPROCESS_DIR_ENV)
        self._host_collectors: list[Collector] = []
        self.requests = Counter(
            f"{PREFIX}_requests", "HTTP requests to model routes, by response code",
            ["model", "route", "code"], registry=registry,
        )  # fmt: skip
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds", "End-to-end request time, arrival to response",
            ["model", "route"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.preprocess_duration = Histogram(
            f"{PREFIX}_preprocess_duration_seconds", "Decode and resize time per image",
            ["model"], buckets=STAGE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds", "Time from enqueue to the start of the image's batch forward",
            ["model"], buckets=STAGE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.inference_duration = Histogram(
            f"{PREFIX}_inference_duration_seconds", "One batch forward, device sync included",
            ["model"], buckets=STAGE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size", "Images per forward",
            ["model"], buckets=batch_size_buckets(max_batch_size), registry=registry,
        )  # fmt: skip
        self.images = Counter(f"{PREFIX}_images", "Images run through a forward", ["model"], registry=registry)
        self.rejected = Counter(
            f"{PREFIX}_rejected", "Images or requests refused or dropped, by reason",
            ["model", "reason"], registry=registry,
        )  # fmt: skip
        self.forward_failures = Counter(
            f"{PREFIX}_forward_failures", "Batch forwards that raised", ["model"], registry=registry
        )
        # Across workers, depth and capacity add up, and the server is ready when every worker is.
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth", "Admitted images waiting for a forward",
            ["model"], registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.queue_capacity = Gauge(
            f"{PREFIX}_queue_capacity", "Admitted images a model's queue holds at most",
            ["model"], registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.inflight = Gauge(
            f"{PREFIX}_inflight_requests", "Model-route requests being handled",
            registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.model_info = Gauge(
            f"{PREFIX}_model_info", "Loaded models (value is always 1)",
            ["model", "arch", "device", "dtype", "weights", "runtime"], registry=registry,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self.ready = Gauge(
            f"{PREFIX}_ready", "1 when every model is loaded and warm", registry=registry, multiprocess_mode="livemin"
        )
        if self._multiprocess_dir is None:
            # Per-process figures: with several workers, WorkerProcessesCollector reports each one.
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

    @property
    def multiprocess(self) -> bool:
        return self._multiprocess_dir is not None

    def add_host_collector(self, collector: Collector) -> None:
        """A collector of machine-wide figures (GPU memory), exposed once whichever worker answers."""
        self.registry.register(collector)
        self._host_collectors.append(collector)

    def exposition(self) -> bytes:
        """The Prometheus text for /metrics: this process's registry, or every worker's summed."""
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        MultiProcessCollector(combined, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
        combined.register(WorkerProcessesCollector(self._multiprocess_dir))
        for collector in self._host_collectors:
            combined.register(collector)
        return generate_latest(combined)

    def init_model(self, model: str, *, queue_capacity: int) -> None:
        """Create every label set up front so dashboards show zeros rather than gaps."""
        for route in ROUTES:
            for code in STATUS_CODES:
                self.requests.labels(model, route, code)
            self.request_duration.labels(model, route)
        for reason in REJECT_REASONS:
            self.rejected.labels(model, reason)
        for metric in (self.preprocess_duration, self.queue_wait, self.inference_duration, self.batch_size):
            metric.labels(model)
        self.images.labels(model)
        self.forward_failures.labels(model)
        self.queue_depth.labels(model).set(0)
        self.queue_capacity.labels(model).set(queue_capacity)

    def observer(self, model: str) -> ModelObserver:
        return ModelObserver(self, model)


class ModelObserver:
    """The batcher's view of the metrics for one model (see `batching.BatchObserver`)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._batch_size = metrics.batch_size.labels(model)
        self._images = metrics.images.labels(model)
        self._queue_wait = metrics.queue_wait.labels(model)
        self._inference = metrics.inference_duration.labels(model)
        self._failures = metrics.forward_failures.labels(model)
        self._depth = metrics.queue_depth.labels(model)
        self._rejected = metrics.rejected
        self._model = model

    def on_batch(self, size: int, queue_waits_s: Sequence[float]) -> None:
        self._batch_size.observe(size)
        self._images.inc(size)
        for wait in queue_waits_s:
            self._queue_wait.observe(wait)

    def on_forward(self, duration_s: float, failed: bool) -> None:
        self._inference.observe(duration_s)
        if failed:
            self._failures.inc()

    def on_dropped(self, reason: str, count: int) -> None:
        self._rejected.labels(self._model, reason).inc(count)

    def on_depth(self, depth: int) -> None:
        self._depth.set(depth)


class WorkerProcessesCollector:
    """CPU, memory and open files of every live worker, with a `pid` label: prometheus-client's own
    process collector sees only the process that answers the scrape. The workers are the pids that
    write to the multiprocess directory (`counter_<pid>.db`, ...)."""

    _PID_IN_NAME = re.compile(r"_(\d+)\.db$")

    def __init__(self, multiprocess_dir: str) -> None:
        self._dir = Path(multiprocess_dir)

    def collect(self) -> Iterable[Metric]:
        cpu = CounterMetricFamily("process_cpu_seconds", "User and system CPU time of a worker", labels=["pid"])
        memory = GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of a worker", labels=["pid"])
        files = GaugeMetricFamily("process_open_fds", "Open file descriptors of a worker", labels=["pid"])
        page_size, ticks = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
        pids = {int(m.group(1)) for path in self._dir.glob("*.db") if (m := self._PID_IN_NAME.search(path.name))}
        for pid in sorted(pids):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
                open_fds = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, IndexError, ValueError):  # gone since its files were written
                continue
            label = [str(pid)]
            cpu.add_metric(label, (int(stat[11]) + int(stat[12])) / ticks)
            memory.add_metric(label, float(resident_pages * page_size))
            files.add_metric(label, float(open_fds))
        yield cpu
        yield memory
        yield files


class CudaMemoryCollector:
    """GPU memory (and utilization where NVML answers), read at scrape time."""

    def __init__(self, device_indices: Iterable[int]) -> None:
        self._devices = list(device_indices)

    def collect(self) -> Iterable[Metric]:
        import torch  # only constructed on CUDA hosts

        allocated = GaugeMetricFamily(
            f"{PREFIX}_gpu_memory_allocated_bytes", "GPU memory held by tensors", labels=["device"]
        )
        reserved = GaugeMetricFamily(
            f"{PREFIX}_gpu_memory_reserved_bytes", "GPU memory reserved by the caching allocator", labels=["device"]
        )
        utilization = GaugeMetricFamily(
            f"{PREFIX}_gpu_utilization_ratio", "GPU busy fraction over the last sample (NVML)", labels=["device"]
        )
        for index in self._devices:
            label = [f"cuda:{index}"]
            allocated.add_metric(label, float(torch.cuda.memory_allocated(index)))
            reserved.add_metric(label, float(torch.cuda.memory_reserved(index)))
            # NVML (pynvml) is optional: without it there is no utilization sample.
            with contextlib.suppress(Exception):
                utilization.add_metric(label, torch.cuda.utilization(index) / 100.0)
        yield allocated
        yield reserved
        if utilization.samples:
            yield utilization
