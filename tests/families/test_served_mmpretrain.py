"""mmpretrain checkpoints served as NAME=PATH: each photo through mmpretrain's own full pipeline and
through the server's HTTP route gives the same top-1, probabilities within docs/models.md's figure,
and the same features from /embed."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.config import Settings
from service.models.labels import shipped_labels
from service.models.registry import load_all
from tests.families.mm_reference import make_mm_checkpoint, mm_pipeline_input, mm_reference_outputs
from tests.http.conftest import upload

pytestmark = pytest.mark.families

# docs/models.md: with OpenCV installed every mmpretrain pipeline is reproduced pixel for pixel, so
# what is left is float32 summation order (onnxruntime against torch): up to 3.6e-5 measured with
# `benchmarks.family_agreement`, 1.3e-4 seen on a ResNetV1d-18 whose peaked head has logits near 40.
PROBABILITY_BOUND = 5e-4
FEATURE_BOUND = 1e-4  # relative to the largest feature

# (served name, backbone, depth, classes, file name, mmpretrain config, expected preset, architecture, options)
CASES = [
    (
        "r18",
        "ResNet",
        18,
        1000,
        "resnet18_8xb32_in1k_20210831-fbbb1da6.pth",
        "resnet18_8xb32_in1k",
        "mmpretrain-in1k",
        "ResNet-18",
        {},
    ),
    ("v1d18", "ResNetV1d", 18, 1000, "my-v1d.pth", "resnetv1d50_8xb32_in1k", "mmpretrain-pil", "ResNetV1d-18", {}),
    (
        "v1c18",
        "ResNetV1c",
        18,
        1000,
        "my-v1c.pth#mmpretrain-in1k",
        "resnet18_8xb32_in1k",
        "mmpretrain-in1k",
        "ResNetV1c-18",
        {},
    ),
    (
        "rsb",
        "ResNet",
        50,
        1000,
        "resnet50_8xb256-rsb-a2-300e_in1k_20211228-0fd8be6e.pth",
        "resnet50_8xb256-rsb-a2-300e_in1k",
        "rsb",
        "ResNet-50",
        {},
    ),
    ("cub", "ResNet", 18, 200, "birds.pth", "resnet50_8xb8_cub", "cub", "ResNet-18", {}),
    (
        "cifar",
        "ResNet_CIFAR",
        18,
        10,
        "resnet18_b16x8_cifar10_20210528-bd6371c8.pth",
        "resnet18_8xb16_cifar10",
        "cifar10",
        "ResNet_CIFAR-18",
        {},
    ),
]


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _thumbnail(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mmpretrain")
    photos = {name: _jpeg(getattr(skimage.data, name)()) for name in ("chelsea", "coffee", "astronaut")}
    thumbnails = {f"{name}32": _thumbnail(data) for name, data in photos.items()}
    for name, data in {**photos, **thumbnails}.items():
        (directory / name).write_bytes(data)
    models, references = [], {}
    for name, backbone, depth, classes, file_name, config, _, _, options in CASES:
        images = thumbnails if backbone == "ResNet_CIFAR" else photos
        probe = torch.cat([mm_pipeline_input(config, directory / image) for image in images])
        file_name, _, preset = file_name.partition("#")
        model, path = make_mm_checkpoint(
            directory, backbone, depth, classes, seed=4, file_name=file_name, probe=probe, **options
        )
        logits, features = mm_reference_outputs(model, probe)
        references[name] = (images, torch.softmax(logits, dim=1), features)
        models.append(f"{name}={path}" + (f"#{preset}" if preset else ""))
    (directory / "cub.labels.txt").write_text("".join(f"bird {i}\n" for i in range(200)))
    settings = Settings(models=tuple(models), weights_dir=directory, device="cpu")
    with TestClient(create_app(settings, load_models=load_all)) as client:
        yield client, references


def _index(label: str, classes: int) -> int:
    if classes == 1000:
        return shipped_labels("imagenet").index(label)
    if classes == 10:
        return shipped_labels("cifar10").index(label)
    return int(label.removeprefix("bird "))


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_each_pipeline_answers_as_mmpretrain_does(served, case):
    client, references = served
    name, _, depth, classes, _, _, preset, architecture, _ = case
    images, probabilities, features = references[name]
    info = client.get(f"/models/{name}").json()
    assert (info["family"], info["architecture"], info["preprocessing"]["preset"]) == (
        "mmpretrain",
        architecture,
        preset,
    )
    assert info["num_classes"] == classes and info["embedding_dim"] == (512 if depth < 50 else 2048)
    for index, data in enumerate(images.values()):
        answer = client.post(f"/{name}/predict?topk={classes}", **upload(data)).json()["prediction"][0]
        served_probabilities = torch.zeros(classes)
        for entry in answer:
            served_probabilities[_index(entry["class"], classes)] = entry["probability"]
        reference = probabilities[index]
        assert reference.max() > 0.5  # peaked: a transform mistake moves the answer
        assert int(served_probabilities.argmax()) == int(reference.argmax())
        assert (served_probabilities - reference).abs().max().item() <= PROBABILITY_BOUND
        embedding = torch.tensor(client.post(f"/{name}/embed", **upload(data)).json()["embeddings"][0])
        scale = features[index].abs().max()
        assert ((embedding - features[index]).abs().max() / scale).item() <= FEATURE_BOUND


def test_labels_come_from_the_family_or_a_file(served):
    client, _ = served
    sources = {name: client.get(f"/models/{name}").json()["label_source"] for name in ("r18", "cub", "cifar")}
    assert sources == {"r18": "ImageNet-1k synsets", "cub": "file cub.labels.txt", "cifar": "CIFAR-10 class names"}


def test_a_cifar_model_takes_a_large_photo_resized(served):
    client, _ = served
    big = _jpeg(skimage.data.astronaut())  # 512x512: resized to 32x32 like any other photo
    response = client.post("/cifar/predict?topk=10", **upload(big))
    assert response.status_code == 200, response.text
    assert {e["class"] for e in response.json()["prediction"][0]} == set(shipped_labels("cifar10"))


def test_an_unrelated_state_dict_names_the_closest_family(tmp_path):
    from service.errors import StartupError

    _, path = make_mm_checkpoint(tmp_path, "ResNetV1d", 50, 1000, seed=0, peaked=False)
    state = torch.load(path, weights_only=False)
    state["state_dict"]["backbone.layer2.0.conv9.weight"] = state["state_dict"].pop("backbone.layer2.0.conv1.weight")
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    settings = Settings(models=(f"broken={broken}",), weights_dir=tmp_path, device="cpu").resolve(on_gpu=False)
    with pytest.raises(StartupError) as raised:
        load_all(settings, torch.device("cpu"))
    message = str(raised.value)
    assert "ResNetV1d-50" in message and "backbone.layer2.0.conv1.weight" in message and "\n" not in message
