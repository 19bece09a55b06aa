"""Metric objects on an injected registry: label sets pre-initialised, buckets, the GPU collector."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from service.metrics import REJECT_REASONS, CudaMemoryCollector, Metrics, batch_size_buckets


def test_batch_size_buckets_double_up_to_the_max():
    assert batch_size_buckets(1) == (1.0,)
    assert batch_size_buckets(8) == (1.0, 2.0, 4.0, 8.0)
    assert batch_size_buckets(12) == (1.0, 2.0, 4.0, 8.0, 16.0)


def test_label_sets_exist_before_any_traffic():
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_batch_size=8)
    metrics.init_model("resnet18v1", queue_capacity=64)
    text = generate_latest(registry).decode()
    for reason in REJECT_REASONS:
        assert f'resnet_serve_rejected_total{{model="resnet18v1",reason="{reason}"}} 0.0' in text
    assert 'resnet_serve_requests_total{code="200",model="resnet18v1",route="predictions"} 0.0' in text
    assert 'resnet_serve_batch_size_bucket{le="8.0",model="resnet18v1"} 0.0' in text
    assert 'resnet_serve_queue_depth{model="resnet18v1"} 0.0' in text
    assert 'resnet_serve_queue_capacity{model="resnet18v1"} 64.0' in text
    for code in ("400", "413", "415", "429", "500", "503", "504"):
        assert f'resnet_serve_requests_total{{code="{code}",model="resnet18v1",route="predict"}} 0.0' in text


def test_observer_counts_batches_images_and_drops():
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_batch_size=8)
    metrics.init_model("m", queue_capacity=8)
    observer = metrics.observer("m")
    observer.on_batch(3, [0.01, 0.02, 0.03])
    observer.on_forward(0.1, failed=True)
    observer.on_dropped("deadline", 2)
    observer.on_depth(5)
    value = registry.get_sample_value
    assert value("resnet_serve_batch_size_sum", {"model": "m"}) == 3
    assert value("resnet_serve_images_total", {"model": "m"}) == 3
    assert value("resnet_serve_queue_wait_seconds_count", {"model": "m"}) == 3
    assert value("resnet_serve_forward_failures_total", {"model": "m"}) == 1
    assert value("resnet_serve_rejected_total", {"model": "m", "reason": "deadline"}) == 2
    assert value("resnet_serve_queue_depth", {"model": "m"}) == 5


def test_gpu_memory_collector_reads_torch_cuda(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 1024 * (index + 1))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 4096)

    def no_nvml(index: int) -> int:
        raise ModuleNotFoundError("pynvml")

    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    registry = CollectorRegistry()
    registry.register(CudaMemoryCollector([0, 1]))
    assert registry.get_sample_value("resnet_serve_gpu_memory_allocated_bytes", {"device": "cuda:1"}) == 2048
    assert registry.get_sample_value("resnet_serve_gpu_memory_reserved_bytes", {"device": "cuda:0"}) == 4096
    assert registry.get_sample_value("resnet_serve_gpu_utilization_ratio", {"device": "cuda:0"}) is None


def test_memory_helpers_run_on_this_platform(monkeypatch: pytest.MonkeyPatch):
    from service import memory

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    memory.limit_arenas()  # an explicit setting wins: nothing to do, and no error
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    memory.limit_arenas()
    buffers = [bytearray(1 << 20) for _ in range(64)]
    del buffers
    assert isinstance(memory.give_back_free_memory(), bool)
