"""POST /{model}/embed: the pooled features of each image, against a direct torchvision forward."""

from __future__ import annotations

import asyncio
import io

import pytest
import torch
from PIL import Image, ImageOps
from torchvision.models import get_model_weights

from tests.http.conftest import CPU_RUNTIMES, error_of, upload
from tests.http.test_correctness import reference_model

# The features are sums over a 7x7 pool of activations in the tens; onnxruntime adds in another order.
TOLERANCE = 1e-4


def reference_features(weights_dir, name: str, arch: str, data: bytes) -> torch.Tensor:
    transform = get_model_weights(arch).IMAGENET1K_V1.transforms()
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    model = reference_model(name, arch, str(weights_dir / f"{name}.safetensors"))
    body = torch.nn.Sequential(*list(model.children())[:-1])  # everything up to the pooled features
    with torch.inference_mode():
        return torch.flatten(body(transform(image).unsqueeze(0)), 1)[0]


@pytest.mark.parametrize(("name", "arch", "dim"), [("resnet18v1", "resnet18", 512), ("resnet50v1", "resnet50", 2048)])
def test_embeddings_match_the_reference_features(runtime_client, weights_dir, photos, name, arch, dim):
    for photo in ("kitten.jpg", "coffee.jpg"):
        response = runtime_client.post(f"/{name}/embed", **upload(photos[photo], photo))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == name and body["dim"] == dim and body["normalized"] is False
        (embedding,) = body["embeddings"]
        expected = reference_features(weights_dir, name, arch, photos[photo])
        assert len(embedding) == dim
        assert torch.allclose(torch.tensor(embedding), expected, atol=TOLERANCE, rtol=1e-5)


def test_normalize_returns_unit_vectors_in_the_same_direction(client, photos):
    files = [("data", (n, photos[n], "image/jpeg")) for n in ("rocket.jpg", "kitten.jpg", "astronaut.jpg")]
    raw = client.post("/resnet18/embed", files=files).json()
    unit = client.post("/resnet18/embed?normalize=true", files=files).json()
    assert unit["normalized"] is True and len(unit["embeddings"]) == 3
    for plain, scaled in zip(raw["embeddings"], unit["embeddings"], strict=True):
        plain_t, scaled_t = torch.tensor(plain), torch.tensor(scaled)
        assert abs(scaled_t.norm().item() - 1.0) < 1e-5
        assert torch.allclose(scaled_t, plain_t / plain_t.norm(), atol=1e-6)


def test_several_images_keep_upload_order_and_a_raw_body_works(client, weights_dir, photos):
    names = ["rocket.jpg", "kitten.jpg"]
    files = [("data", (n, photos[n], "image/jpeg")) for n in names]
    several = client.post("/resnet18v1/embed", files=files).json()["embeddings"]
    raw = client.post("/resnet18v1/embed", content=photos["kitten.jpg"], headers={"Content-Type": "image/jpeg"})
    assert raw.status_code == 200, raw.text
    for name, embedding in zip(names, several, strict=True):
        expected = reference_features(weights_dir, "resnet18v1", "resnet18", photos[name])
        assert torch.allclose(torch.tensor(embedding), expected, atol=TOLERANCE, rtol=1e-5)
    assert torch.allclose(torch.tensor(raw.json()["embeddings"][0]), torch.tensor(several[1]), atol=1e-6)


@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
async def test_embeddings_and_predictions_share_batches_and_each_gets_its_own(serve, weights_dir, photos, runtime):
    names = ["kitten.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    async with serve(max_batch_size=8, max_delay_ms=1000, max_queue_size=64, runtime=runtime) as served:
        requests = [
            served.http.post(f"/resnet18v1/{'embed' if i % 2 else 'predict'}", **upload(photos[names[i % 4]]))
            for i in range(16)
        ]
        responses = await asyncio.gather(*requests)
        batching = (await served.http.get("/models/resnet18v1")).json()["batching"]
        metrics = (await served.http.get("/metrics")).text
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        if i % 2:
            expected = reference_features(weights_dir, "resnet18v1", "resnet18", photos[names[i % 4]])
            assert torch.allclose(torch.tensor(response.json()["embeddings"][0]), expected, atol=TOLERANCE, rtol=1e-5)
        else:
            assert len(response.json()["prediction"][0]) == 5
    assert batching["images_run"] == 16 and batching["batches_run"] < 16
    assert 'resnet_serve_requests_total{code="200",model="resnet18v1",route="embed"} 8.0' in metrics


def test_errors_are_the_prediction_routes_errors(client, photos):
    assert error_of(client.post("/resnet18v1/embed", **upload(b"not an image")))[:2] == (415, "UnsupportedMediaType")
    truncated = photos["kitten.jpg"][:2000]
    assert error_of(client.post("/resnet18v1/embed", **upload(truncated)))[0] == 400
    code, _, message = error_of(client.post("/nosuchmodel/embed", **upload(photos["kitten.jpg"])))
    assert code == 404 and "nosuchmodel" in message
    code, _, message = error_of(client.post("/resnet18v1/embed?normalize=maybe", **upload(photos["kitten.jpg"])))
    assert code == 400 and "normalize" in message
    assert error_of(client.post("/resnet18v1/embed", files={"other": ("x.jpg", photos["kitten.jpg"])}))[0] == 400
    metrics = client.get("/metrics").text
    assert 'model="resnet18v1",route="embed"' in metrics


def test_the_route_is_in_the_openapi_document(client):
    document = client.get("/openapi.json").json()
    operation = document["paths"]["/{model}/embed"]["post"]
    assert operation["requestBody"]["content"]["multipart/form-data"]
    assert {p["name"] for p in operation["parameters"]} == {"model", "normalize"}
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert set(document["components"]["schemas"][schema]["properties"]) == {"model", "dim", "normalized", "embeddings"}
