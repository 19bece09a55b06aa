"""A server's Prometheus metrics: scraped, parsed with prometheus_client's own parser, looked up by
name and labels, and the deltas of resnet-serve's histograms over a load run."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

PREFIX = "resnet_serve"


@dataclass(frozen=True)
class Metrics:
    """One scrape: every sample of every family, as the text listed them."""

    samples: tuple[Sample, ...]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        return cls(tuple(sample for family in text_string_to_metric_families(text) for sample in family.samples))

    def matching(self, name: str, labels: Mapping[str, str] | None = None) -> Iterator[Sample]:
        """The samples called `name` that carry at least `labels` (other labels may differ)."""
        wanted = (labels or {}).items()
        for sample in self.samples:
            if sample.name == name and all(sample.labels.get(key) == value for key, value in wanted):
                yield sample

    def value(self, name: str, labels: Mapping[str, str] | None = None, default: float = 0.0) -> float:
        """The first matching sample's value, or `default` when none matches."""
        return next((float(sample.value) for sample in self.matching(name, labels)), default)

    def total(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """The sum over the matching samples (0 when none match)."""
        return sum(float(sample.value) for sample in self.matching(name, labels))


def scrape(url: str, timeout_s: float = 10.0) -> Metrics | None:
    """The metrics at `url` (the full /metrics address), or None when it does not answer with
    Prometheus text (a server without metrics, or one gone)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode()
        return Metrics.parse(text)
    except (OSError, ValueError):
        return None


@dataclass
class ServerStats:
    """Deltas of the server's own metrics over one load run (resnet-serve names)."""

    batches: float = 0.0
    images: float = 0.0
    mean_batch: float = 0.0
    requests: float = 0.0
    mean_request_s: float = 0.0
    mean_preprocess_s: float = 0.0
    mean_queue_wait_s: float = 0.0
    mean_inference_per_batch_s: float = 0.0
    inference_busy_s: float = 0.0
    preprocess_busy_s: float = 0.0
    cpu_s: float = 0.0

    @classmethod
    def from_delta(cls, before: Metrics, after: Metrics, model: str | None) -> ServerStats:
        labels = {"model": model} if model is not None else None

        def delta(name: str) -> float:
            return after.total(name, labels) - before.total(name, labels)

        def mean(name: str) -> tuple[float, float]:
            count = delta(f"{PREFIX}_{name}_count")
            total = delta(f"{PREFIX}_{name}_sum")
            return (total / count if count else 0.0), total

        batches = delta(f"{PREFIX}_batch_size_count")
        images = delta(f"{PREFIX}_batch_size_sum")
        mean_request, _ = mean("request_duration_seconds")
        mean_preprocess, preprocess_busy = mean("preprocess_duration_seconds")
        mean_wait, _ = mean("queue_wait_seconds")
        mean_inference, inference_busy = mean("inference_duration_seconds")
        return cls(
            batches=batches,
            images=images,
            mean_batch=images / batches if batches else 0.0,
            requests=delta(f"{PREFIX}_request_duration_seconds_count"),
            mean_request_s=mean_request,
            mean_preprocess_s=mean_preprocess,
            mean_queue_wait_s=mean_wait,
            mean_inference_per_batch_s=mean_inference,
            inference_busy_s=inference_busy,
            preprocess_busy_s=preprocess_busy,
            cpu_s=after.total("process_cpu_seconds_total") - before.total("process_cpu_seconds_total"),
        )
