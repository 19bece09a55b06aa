"""Batch buckets, staged batches and compiled forwards, on the CPU (the CUDA graphs are in test_gpu_runner)."""

from __future__ import annotations

import pytest
import torch

from service.config import Settings, power_of_two_buckets
from service.imaging import Preprocessing
from service.models.catalog import CATALOG
from service.models.runner import ExecutionPlan, ModelRunner
from service.models.weights import build_model, find_weights


class RecordsBatchSizes(torch.nn.Module):
    """A tiny classifier that remembers the batch size of every forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 5)
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def images(count: int, size: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(count)
    return [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator) for _ in range(count)]


def tiny_runner(plan: ExecutionPlan) -> tuple[ModelRunner, RecordsBatchSizes]:
    model = RecordsBatchSizes()
    return ModelRunner.with_torch(model, Preprocessing(crop_size=8), device=torch.device("cpu"), plan=plan), model


def test_power_of_two_buckets_end_at_the_max_batch():
    assert power_of_two_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert power_of_two_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert power_of_two_buckets(1) == (1,)


def test_a_batch_goes_to_the_smallest_bucket_that_holds_it():
    plan = ExecutionPlan(buckets=(1, 2, 4, 8))
    assert [plan.bucket_for(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert ExecutionPlan().bucket_for(5) == 5
    with pytest.raises(ValueError, match="larger than the largest bucket"):
        plan.bucket_for(9)


def test_plans_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="ascending"):
        ExecutionPlan(buckets=(4, 2))
    with pytest.raises(ValueError, match="need batch buckets"):
        ExecutionPlan(cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA graphs were asked for"):
        tiny_runner(ExecutionPlan(buckets=(1, 2), cuda_graphs=True))


def test_padding_to_a_bucket_changes_no_answer_and_returns_only_the_real_images():
    padded_runner, padded_model = tiny_runner(ExecutionPlan(buckets=(1, 2, 4, 8)))
    exact_runner, exact_model = tiny_runner(ExecutionPlan())
    batch = images(5)
    padded = padded_runner.predict(batch)
    exact = exact_runner.predict(batch)
    assert len(padded) == 5
    assert padded_model.batch_sizes == [8] and exact_model.batch_sizes == [5]
    assert torch.allclose(torch.stack(padded), torch.stack(exact), atol=1e-6, rtol=0)


def test_staging_and_running_apart_equals_one_predict():
    runner, _ = tiny_runner(ExecutionPlan(buckets=(4,)))
    first, second = images(3), images(2)
    staged_first, staged_second = runner.stage(first), runner.stage(second)  # two staged before either runs
    assert (staged_first.count, staged_first.images.shape[0]) == (3, 4)
    assert torch.equal(staged_first.images[3], torch.zeros(3, 8, 8, dtype=torch.uint8))
    assert torch.equal(torch.stack(runner.run(staged_first)), torch.stack(runner.predict(first)))
    assert torch.equal(torch.stack(runner.run(staged_second)), torch.stack(runner.predict(second)))


def test_warm_up_runs_every_bucket_before_serving():
    runner, model = tiny_runner(ExecutionPlan(buckets=(1, 2, 4, 8)))
    runner.warm_up([1, 8])
    assert sorted(model.batch_sizes) == [1, 2, 4, 8]
    exact_runner, exact_model = tiny_runner(ExecutionPlan())
    exact_runner.warm_up([1, 8])
    assert sorted(exact_model.batch_sizes) == [1, 8]


def test_settings_pick_buckets_graphs_and_overlap_by_device():
    gpu = Settings().resolve(on_gpu=True)
    cpu = Settings().resolve(on_gpu=False)
    assert (gpu.batch_buckets, gpu.cuda_graphs, gpu.max_batches_in_flight) == ((1, 2, 4, 8, 16, 32, 64), True, 2)
    assert (cpu.batch_buckets, cpu.cuda_graphs, cpu.max_batches_in_flight) == ((), False, 1)
    assert Settings(batch_buckets="off").resolve(on_gpu=True).cuda_graphs is False
    assert Settings(batch_buckets="8, 2,4").resolve(on_gpu=False).batch_buckets == (2, 4, 8)
    assert Settings(batch_buckets="auto").resolve(on_gpu=True).batch_buckets == gpu.batch_buckets


def test_settings_refuse_buckets_below_the_batch_and_graphs_without_cuda():
    with pytest.raises(ValueError, match=r"largest batch bucket \(4\) is below the max batch size \(8\)"):
        Settings(batch_buckets="1,2,4").resolve(on_gpu=False)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        Settings(cuda_graphs=True).resolve(on_gpu=False)
    with pytest.raises(ValueError, match="each at least 1"):
        Settings(batch_buckets="0,4")


def test_settings_read_the_plan_from_the_environment(monkeypatch):
    monkeypatch.setenv("RESNET_SERVE_BATCH_BUCKETS", "1,4,16")
    monkeypatch.setenv("RESNET_SERVE_MAX_BATCHES_IN_FLIGHT", "3")
    monkeypatch.setenv("RESNET_SERVE_COMPILE", "true")
    plan = Settings(max_batch_size=16).resolve(on_gpu=False)
    assert (plan.batch_buckets, plan.max_batches_in_flight, plan.compile) == ((1, 4, 16), 3, True)


def test_a_compiled_resnet_agrees_with_eager_on_every_bucket(weights_dir):
    spec = CATALOG["resnet18v1"]
    weights = find_weights(spec, weights_dir)
    assert weights is not None
    eager = ModelRunner.with_torch(build_model(spec, weights), Preprocessing(), device=torch.device("cpu"))
    plan = ExecutionPlan(buckets=(1, 2), compile=True)
    compiled = ModelRunner.with_torch(
        build_model(spec, weights), Preprocessing(), device=torch.device("cpu"), plan=plan
    )
    compiled.warm_up([1, 2])
    batch = images(2, size=224)
    assert torch.allclose(torch.stack(compiled.predict(batch)), torch.stack(eager.predict(batch)), atol=1e-5, rtol=0)
    assert torch.allclose(compiled.predict(batch[:1])[0], eager.predict(batch[:1])[0], atol=1e-5, rtol=0)
