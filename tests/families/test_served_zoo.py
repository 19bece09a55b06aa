"""ONNX model-zoo ResNet files served as NAME=PATH: the answers equal onnxruntime run directly on the
file with the zoo's own preprocessing; a v2 file imported into torch agrees within 1e-4."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torchvision.transforms as T
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from service.api.app import create_app
from service.config import Settings
from service.errors import StartupError
from service.models.families.onnx_graph import inspect_classifier
from service.models.registry import load_all
from tests.conftest import SYNSETS
from tests.families.zoo_files import write_zoo_file
from tests.http.conftest import upload

pytestmark = pytest.mark.families

SYNSET_LINES = SYNSETS.read_text().strip().splitlines()
# The zoo page's preprocessing (imagenet_preprocess): torchvision's transform with PIL's resize.
ZOO_TRANSFORM = T.Compose(
    [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
)


@pytest.fixture(scope="module")
def zoo_files(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("zoo")
    return {
        "v1": write_zoo_file(directory / "resnet18-v1-7.onnx", "v1", 18, seed=1),
        "v2": write_zoo_file(directory / "resnet18-v2-7.onnx", "v2", 18, seed=2),
        "v2-batch1": write_zoo_file(directory / "resnet18-v2-fixed.onnx", "v2", 18, seed=2, fixed_batch=1),
    }


def _zoo_input(data: bytes) -> np.ndarray:
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return ZOO_TRANSFORM(image).unsqueeze(0).numpy()


def _reference(path: Path, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """onnxruntime on the file as given: softmax of its logits; and its pooled features, read with
    onnx's own sub-model extractor up to the tensor the head consumes."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _zoo_input(data)
    (logits,) = session.run(None, {"data": x})
    model = onnx.load(str(path))
    features_name = inspect_classifier(model, path).features_name
    extracted = path.with_suffix(".features.onnx")
    onnx.utils.extract_model(str(path), str(extracted), ["data"], [features_name])
    (features,) = onnxruntime.InferenceSession(str(extracted), providers=["CPUExecutionProvider"]).run(
        None, {"data": x}
    )
    return torch.softmax(torch.from_numpy(logits), dim=1)[0], torch.from_numpy(features).flatten(1)[0]


def _client(weights_dir: Path, files: dict[str, Path], runtime: str) -> TestClient:
    models = tuple(f"{name}={path}" for name, path in files.items())
    settings = Settings(models=models, weights_dir=weights_dir, device="cpu", runtime=runtime)
    return TestClient(create_app(settings, load_models=load_all))


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_zoo_files_answer_as_onnxruntime_on_the_file(tmp_path, zoo_files, photos, runtime):
    served = {"zoo18v1": zoo_files["v1"], "zoo18v2": zoo_files["v2"]}
    with _client(tmp_path, served, runtime) as client:
        infos = {name: client.get(f"/models/{name}").json() for name in served}
        answers = {
            (name, photo): (
                client.post(f"/{name}/predict?topk=1000", **upload(photos[photo])).json()["prediction"][0],
                client.post(f"/{name}/embed", **upload(photos[photo])).json()["embeddings"][0],
            )
            for name in served
            for photo in ("kitten.jpg", "rocket.jpg")
        }
    assert infos["zoo18v2"]["family"] == "onnx-zoo" and infos["zoo18v2"]["architecture"] == "ResNet v2-18"
    assert infos["zoo18v1"]["architecture"] == "ResNet v1-18" and infos["zoo18v1"]["embedding_dim"] == 512
    assert infos["zoo18v2"]["preprocessing"]["preset"] == "onnx-zoo"
    assert infos["zoo18v2"]["label_source"] == "ImageNet-1k synsets"
    # A v2 file runs on torch when torch is asked for; Gluon's v1 has no torch architecture here.
    assert infos["zoo18v2"]["runtime_details"]["name"] == runtime
    assert infos["zoo18v1"]["runtime_details"]["name"] == "onnxruntime"
    for (name, photo), (answer, embedding) in answers.items():
        probabilities, features = _reference(served[name], photos[photo])
        served_probabilities = torch.zeros(1000)
        for entry in answer:
            served_probabilities[SYNSET_LINES.index(entry["class"])] = entry["probability"]
        imported = name == "zoo18v2" and runtime == "torch"
        tolerance = 1e-4 if imported else 1e-5  # the torch import sums in torch's order, not onnxruntime's
        assert int(served_probabilities.argmax()) == int(probabilities.argmax())
        assert (served_probabilities - probabilities).abs().max().item() <= tolerance, (name, photo)
        assert probabilities.max() > 0.3  # peaked weights: a transform mistake would show
        assert torch.allclose(torch.tensor(embedding), features, atol=tolerance * 10, rtol=1e-4)


async def test_a_batch_one_file_serves_concurrent_requests(tmp_path, zoo_files, photos):
    settings = Settings(
        models=(f"fixed={zoo_files['v2-batch1']}",),
        weights_dir=tmp_path,
        device="cpu",
        runtime="onnxruntime",
        max_batch_size=8,
        max_delay_ms=500,
    )
    app = create_app(settings, load_models=load_all)
    names = ["kitten.jpg", "coffee.jpg", "rocket.jpg", "chelsea.jpg"]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            responses = await asyncio.gather(
                *(http.post("/fixed/predict?topk=1", **upload(photos[names[i % 4]])) for i in range(8))
            )
            batching = (await http.get("/models/fixed")).json()["batching"]
    assert batching["batches_run"] < 8  # batched by the server, run one image at a time by the runtime
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        probabilities, _ = _reference(zoo_files["v2-batch1"], photos[names[i % 4]])
        (top,) = response.json()["prediction"][0]
        assert SYNSET_LINES.index(top["class"]) == int(probabilities.argmax())
        assert abs(top["probability"] - probabilities.max().item()) <= 1e-5


def test_a_graph_that_takes_no_image_is_refused_in_one_line(tmp_path):
    text_input = onnx.helper.make_tensor_value_info("tokens", onnx.TensorProto.INT64, ["N", 16])
    output = onnx.helper.make_tensor_value_info("out", onnx.TensorProto.INT64, ["N", 16])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["tokens"], ["out"])], "g", [text_input], [output]
    )
    path = tmp_path / "text.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    settings = Settings(models=(f"text={path}",), weights_dir=tmp_path, device="cpu").resolve(on_gpu=False)
    with pytest.raises(StartupError) as raised:
        load_all(settings, torch.device("cpu"))
    assert "text.onnx" in str(raised.value) and "\n" not in str(raised.value)
