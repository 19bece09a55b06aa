"""The CUDA path of the runner: skipped without a GPU (the `gpu` marker), run wherever there is one."""

from __future__ import annotations

import pytest
import torch

from service.imaging import Preprocessing, preprocess
from service.models.catalog import CATALOG
from service.models.runner import ModelRunner
from service.models.weights import build_model, find_weights

pytestmark = pytest.mark.gpu


def runner_for(weights_dir, dtype: torch.dtype) -> ModelRunner:
    spec = CATALOG["resnet18v1"]
    weights = find_weights(spec, weights_dir)
    assert weights is not None
    return ModelRunner(build_model(spec, weights), Preprocessing(), device=torch.device("cuda"), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_agrees_with_fp32_on_real_photos(weights_dir, photos, dtype):
    images = [preprocess(data, Preprocessing(), max_pixels=50_000_000) for data in photos.values()]
    exact = torch.stack(runner_for(weights_dir, torch.float32).predict(images))
    fast = torch.stack(runner_for(weights_dir, dtype).predict(images))
    assert torch.equal(exact.argmax(dim=1), fast.argmax(dim=1))
    assert (exact - fast).abs().max().item() <= 1e-2


def test_cuda_results_match_the_cpu(weights_dir, photos):
    images = [preprocess(data, Preprocessing(), max_pixels=50_000_000) for data in photos.values()]
    spec = CATALOG["resnet18v1"]
    weights = find_weights(spec, weights_dir)
    assert weights is not None
    cpu = ModelRunner(build_model(spec, weights), Preprocessing(), device=torch.device("cpu"))
    gpu = runner_for(weights_dir, torch.float32)
    assert torch.allclose(torch.stack(cpu.predict(images)), torch.stack(gpu.predict(images)), atol=1e-4)
