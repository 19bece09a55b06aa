"""The HTTP answer equals a direct torchvision forward of the same checkpoint on the same photo."""

from __future__ import annotations

import asyncio
import io
from functools import cache

import pytest
import torch
import torchvision
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torchvision.models import get_model_weights

from tests.conftest import SYNSETS
from tests.http.conftest import CPU_RUNTIMES, upload

TOLERANCE = 1e-5


@cache
def reference_model(name: str, arch: str, weights_path: str) -> torch.nn.Module:
    model = torchvision.models.get_model(arch, weights=None)
    model.load_state_dict(load_file(weights_path))
    return model.eval()


def reference_probabilities(weights_dir, name: str, arch: str, data: bytes) -> torch.Tensor:
    # Random-init checkpoints are served with the classic V1 evaluation transform.
    transform = get_model_weights(arch).IMAGENET1K_V1.transforms()
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    model = reference_model(name, arch, str(weights_dir / f"{name}.safetensors"))
    with torch.inference_mode():
        return torch.softmax(model(transform(image).unsqueeze(0)), dim=1)[0]


SYNSET_LINES = SYNSETS.read_text().strip().splitlines()


def assert_matches(answer: list[dict], expected: torch.Tensor, k: int, tolerance: float = TOLERANCE) -> None:
    assert len(answer) == k
    probabilities = [entry["probability"] for entry in answer]
    assert probabilities == sorted(probabilities, reverse=True)
    for entry in answer:
        index = SYNSET_LINES.index(entry["class"])
        assert abs(entry["probability"] - expected[index].item()) <= tolerance, entry
    top = torch.topk(expected, k).indices.tolist()
    assert [SYNSET_LINES.index(e["class"]) for e in answer] == top


@pytest.mark.parametrize(("name", "arch"), [("resnet18v1", "resnet18"), ("resnet50v1", "resnet50")])
def test_each_photo_matches_the_reference_forward(runtime_client, weights_dir, photos, name, arch):
    runtime = runtime_client.get(f"/models/{name}").json()["runtime_details"]["name"]
    assert runtime in CPU_RUNTIMES
    for photo, data in photos.items():
        response = runtime_client.post(f"/{name}/predict?topk=5", **upload(data, photo))
        assert response.status_code == 200, response.text
        (answer,) = response.json()["prediction"]
        assert_matches(answer, reference_probabilities(weights_dir, name, arch, data), 5)


def test_torchserve_route_and_alias_give_the_same_answer(client, weights_dir, photos):
    data = photos["kitten.jpg"]
    answer = client.post("/predictions/resnet18?topk=3", **upload(data)).json()
    assert isinstance(answer, list) and set(answer[0]) == {"probability", "class"}
    assert_matches(answer, reference_probabilities(weights_dir, "resnet18v1", "resnet18", data), 3)


def test_raw_body_upload(client, weights_dir, photos):
    data = photos["coffee.jpg"]
    response = client.post("/resnet18v1/predict", content=data, headers={"Content-Type": "image/jpeg"})
    (answer,) = response.json()["prediction"]
    assert_matches(answer, reference_probabilities(weights_dir, "resnet18v1", "resnet18", data), 5)


def test_several_images_in_one_request_keep_upload_order(client, weights_dir, photos):
    names = ["rocket.jpg", "kitten.jpg", "astronaut.jpg"]
    files = [("data", (n, photos[n], "image/jpeg")) for n in names]
    mms = client.post("/resnet18v1/predict?topk=2", files=files).json()["prediction"]
    torchserve = client.post("/predictions/resnet18v1?topk=2", files=files).json()
    assert len(mms) == len(torchserve) == 3
    for name, answer, other in zip(names, mms, torchserve, strict=True):
        assert_matches(answer, reference_probabilities(weights_dir, "resnet18v1", "resnet18", photos[name]), 2)
        assert [e["class"] for e in other] == [e["class"] for e in answer]


def test_topk_returns_that_many_classes(client):
    data = client.post("/resnet18v1/predict?topk=1000", content=b"", headers={})
    assert data.status_code == 400  # no image: checked after topk, which was valid
    full = client.post("/resnet18v1/predict?topk=1000", content=_tiny_png(), headers={"Content-Type": "image/png"})
    (answer,) = full.json()["prediction"]
    assert len(answer) == 1000
    assert abs(sum(e["probability"] for e in answer) - 1.0) < 1e-4


# The second plan pads batches to buckets and stages the next batch while one runs (the GPU's defaults).
STAGED = {"batch_buckets": "1,2,4,8", "max_batches_in_flight": 2}


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
@pytest.mark.parametrize("plan", [{}, STAGED], ids=["exact", "staged"])
async def test_concurrent_callers_are_batched_and_each_gets_its_own_answer(serve, weights_dir, photos, plan, runtime):
    names = ["kitten.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    async with serve(max_batch_size=8, max_delay_ms=1000, max_queue_size=64, runtime=runtime, **plan) as served:
        requests = [served.http.post("/resnet18v1/predict?topk=3", **upload(photos[names[i % 4]])) for i in range(32)]
        responses = await asyncio.gather(*requests)
        model = (await served.http.get("/models/resnet18v1")).json()
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        expected = reference_probabilities(weights_dir, "resnet18v1", "resnet18", photos[names[i % 4]])
        assert_matches(response.json()["prediction"][0], expected, 3)
    assert model["runtime_details"]["name"] == runtime
    batching = model["batching"]
    assert batching["buckets"] == ([1, 2, 4, 8] if plan else [])
    assert batching["max_batches_in_flight"] == (2 if plan else 1)
    assert batching["images_run"] == 32
    assert batching["batches_run"] < 32
    assert batching["mean_batch_size"] > 1


async def test_decode_on_device_answers_within_rounding_and_fails_only_the_broken_jpeg(serve, weights_dir, photos):
    """The same code path as nvJPEG on a GPU, on the CPU device: batched decode, orientation, resize."""
    names = list(photos)
    broken = photos["kitten.jpg"][: len(photos["kitten.jpg"]) // 2]
    async with serve(decode_on_device=True, max_batch_size=8, max_delay_ms=500) as served:
        bodies = [photos[name] for name in names] + [broken]
        responses = await asyncio.gather(
            *(served.http.post("/resnet18v1/predict?topk=1000", **upload(body)) for body in bodies)
        )
        batching = (await served.http.get("/models/resnet18v1")).json()["batching"]
    assert batching["decode_on_device"] is True
    assert batching["batches_run"] < len(bodies)  # the broken one shared a batch with good ones
    *good, bad = responses
    assert bad.status_code == 400 and "decoded" in bad.json()["message"]
    for name, response in zip(names, good, strict=True):
        assert response.status_code == 200, response.text
        expected = reference_probabilities(weights_dir, "resnet18v1", "resnet18", photos[name])
        got = {SYNSET_LINES.index(e["class"]): e["probability"] for e in response.json()["prediction"][0]}
        assert max(got, key=got.__getitem__) == int(expected.argmax())
        # Not bit-identical (another IDCT, a tensor resize): within rounding of the reference.
        assert max(abs(p - expected[i].item()) for i, p in got.items()) < 1e-3


def _onnxruntime_has_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.gpu
@pytest.mark.parametrize("runtime", ["auto", "onnxruntime"])
async def test_the_gpu_defaults_match_the_reference_forward(serve, weights_dir, photos, runtime):
    """CUDA graphs per bucket (torch), two batches in flight, pinned copies: still torchvision's answer;
    and the same through ONNX Runtime's CUDA provider where onnxruntime-gpu is installed."""
    if runtime == "onnxruntime" and not _onnxruntime_has_cuda():
        pytest.skip("onnxruntime-gpu (the CUDA provider) is not installed")
    names = list(photos)
    async with serve(device="cuda", max_delay_ms=50, runtime=runtime) as served:
        requests = [served.http.post("/resnet18v1/predict?topk=3", **upload(photos[names[i % 6]])) for i in range(48)]
        responses = await asyncio.gather(*requests)
        model = (await served.http.get("/models/resnet18v1")).json()
    batching = model["batching"]
    assert model["runtime_details"]["name"] == ("torch" if runtime == "auto" else runtime)
    assert batching["cuda_graphs"] == (runtime == "auto") and batching["max_batches_in_flight"] == 2
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        expected = reference_probabilities(weights_dir, "resnet18v1", "resnet18", photos[names[i % 6]])
        # cuDNN's TF32 convolutions are not bit-exact with the CPU; the classes must still agree.
        assert_matches(response.json()["prediction"][0], expected, 3, tolerance=1e-3)


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()
