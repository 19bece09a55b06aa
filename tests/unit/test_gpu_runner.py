"""The CUDA path of the runner: skipped without a GPU (the `gpu` marker), run wherever there is one."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image, ImageOps

from service.imaging import Preprocessing, preprocess
from service.models.catalog import CATALOG
from service.models.runner import ExecutionPlan, ModelRunner
from service.models.weights import build_model, find_weights

pytestmark = pytest.mark.gpu


def runner_for(weights_dir, dtype: torch.dtype) -> ModelRunner:
    spec = CATALOG["resnet18v1"]
    weights = find_weights(spec, weights_dir)
    assert weights is not None
    return ModelRunner.with_torch(build_model(spec, weights), Preprocessing(), device=torch.device("cuda"), dtype=dtype)


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
    cpu = ModelRunner.with_torch(build_model(spec, weights), Preprocessing(), device=torch.device("cpu"))
    gpu = runner_for(weights_dir, torch.float32)
    assert torch.allclose(
        torch.stack(cpu.predict(images)), torch.stack(gpu.predict(images)), atol=1e-3
    )  # cuDNN convolutions use TF32 by default


def _runner(weights_dir, plan: ExecutionPlan, dtype: torch.dtype = torch.float32) -> ModelRunner:
    spec = CATALOG["resnet18v1"]
    weights = find_weights(spec, weights_dir)
    assert weights is not None
    return ModelRunner.with_torch(
        build_model(spec, weights), Preprocessing(), device=torch.device("cuda"), dtype=dtype, plan=plan
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graphs_give_the_eager_answer_for_every_bucket(weights_dir, photos, dtype):
    images = [preprocess(data, Preprocessing(), max_pixels=50_000_000) for data in photos.values()]
    graphed = _runner(weights_dir, ExecutionPlan(buckets=(1, 2, 4, 8), cuda_graphs=True), dtype)
    graphed.warm_up([1, 8])
    assert sorted(graphed._graphs) == [1, 2, 4, 8]
    eager = _runner(weights_dir, ExecutionPlan(), dtype)
    for count in (1, 2, 3, 6):  # exact buckets and padded ones
        batch = images[:count]
        got, expected = torch.stack(graphed.predict(batch)), torch.stack(eager.predict(batch))
        assert got.shape == (count, 1000)
        assert torch.equal(got.argmax(dim=1), expected.argmax(dim=1))
        assert (got - expected).abs().max().item() <= 1e-3


def test_a_graph_replay_does_not_leak_into_the_previous_answer(weights_dir, photos):
    images = [preprocess(data, Preprocessing(), max_pixels=50_000_000) for data in photos.values()]
    runner = _runner(weights_dir, ExecutionPlan(buckets=(2,), cuda_graphs=True))
    runner.warm_up([2])
    first = torch.stack(runner.predict(images[:2]))
    second = torch.stack(runner.predict(images[2:4]))
    again = torch.stack(runner.predict(images[:2]))
    assert torch.equal(first, again)  # the static output buffer was copied out, not aliased
    assert not torch.equal(first, second)


def test_two_staged_batches_overlap_and_each_gets_its_own_answer(weights_dir, photos):
    images = [preprocess(data, Preprocessing(), max_pixels=50_000_000) for data in photos.values()]
    runner = _runner(weights_dir, ExecutionPlan(buckets=(1, 2, 4), cuda_graphs=True))
    runner.warm_up([4])
    first, second = runner.stage(images[:3]), runner.stage(images[3:5])
    assert first.copied is not None and first.images.is_cuda
    got_first, got_second = runner.run(first), runner.run(second)
    reference = _runner(weights_dir, ExecutionPlan())
    assert torch.allclose(torch.stack(got_first), torch.stack(reference.predict(images[:3])), atol=1e-3)
    assert torch.allclose(torch.stack(got_second), torch.stack(reference.predict(images[3:5])), atol=1e-3)


def test_nvjpeg_decode_agrees_with_the_host_path(weights_dir, photos):
    from service.imaging import inspect_jpeg

    spec = Preprocessing()
    runner = _runner(weights_dir, ExecutionPlan(buckets=(1, 2, 4, 8), cuda_graphs=True))
    runner.warm_up([8])
    encoded = [inspect_jpeg(data, spec, max_pixels=50_000_000) for data in photos.values()]
    host = [preprocess(data, spec, max_pixels=50_000_000) for data in photos.values()]
    on_gpu = torch.stack(runner.predict(encoded))  # type: ignore[arg-type]
    on_host = torch.stack(runner.predict(host))
    assert torch.equal(on_gpu.argmax(dim=1), on_host.argmax(dim=1))
    assert (on_gpu - on_host).abs().max().item() <= 1e-2


def _large_jpegs(photos: dict[str, bytes], count: int, size: tuple[int, int] = (2000, 1500)) -> list[bytes]:
    """`count` different 2000x1500 photos: each real photo enlarged, then mirrored, flipped, inverted."""
    variants = []
    for data in photos.values():
        base = Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        mirrored, flipped = ImageOps.mirror(base), ImageOps.flip(base)
        for image in (
            base,
            mirrored,
            flipped,
            ImageOps.mirror(flipped),
            ImageOps.invert(base),
            ImageOps.invert(mirrored),
        ):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            variants.append(buffer.getvalue())
    assert len(variants) >= count
    return variants[:count]


def test_two_large_nvjpeg_batches_back_to_back_each_match_the_host_path(weights_dir, photos):
    """nvJPEG writes from its own stream into memory from the copy stream's pool. Two batches staged
    back to back, as with two batches in flight: the second's decode must not overwrite the first's
    full-size images while the first's resizes, still queued, read them."""
    from service.imaging import inspect_jpeg

    spec = Preprocessing()
    cap = 50_000_000
    files = _large_jpegs(photos, 32)
    encoded = [inspect_jpeg(data, spec, max_pixels=cap) for data in files]
    assert all(item is not None for item in encoded)
    host = [preprocess(data, spec, max_pixels=cap) for data in files]
    runner = _runner(weights_dir, ExecutionPlan())
    runner.predict(encoded[:1])  # type: ignore[arg-type]  # start the decoder before the race
    first = runner.stage(encoded[:16])  # type: ignore[arg-type]
    second = runner.stage(encoded[16:])  # type: ignore[arg-type]
    assert not first.failures and not second.failures
    torch.cuda.synchronize()
    staged_pixels = torch.cat([first.images[:16].cpu(), second.images[:16].cpu()])
    for index, (got, expected) in enumerate(zip(staged_pixels, host, strict=True)):
        difference = (got.int() - expected.int()).abs().float().mean().item()
        assert difference < 0.5, f"image {index}: {difference:.2f} levels off the host path on average"
    on_gpu = torch.stack(runner.run(first) + runner.run(second))
    on_host = torch.stack(runner.predict(host[:16]) + runner.predict(host[16:]))
    assert torch.equal(on_gpu.argmax(dim=1), on_host.argmax(dim=1))
    assert (on_gpu - on_host).abs().max().item() <= 1e-2
