"""Files served as NAME=PATH in torchvision's layout: recognised, labelled, and answered like the catalog."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from service.api.app import create_app
from service.config import Settings
from service.errors import StartupError
from service.models.registry import load_all
from tests.http.conftest import upload


def _finetuned(tmp_path, classes: int = 10):
    torch.manual_seed(3)
    model = torchvision.models.resnet18(num_classes=classes).eval()
    path = tmp_path / "pets-finetune.pth"
    torch.save({"model": model.state_dict(), "epoch": 12}, path)
    return model, path


def _serve(weights_dir, *models: str, runtime: str = "torch") -> TestClient:
    settings = Settings(models=models, weights_dir=weights_dir, device="cpu", runtime=runtime)
    return TestClient(create_app(settings, load_models=load_all))


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_a_finetuned_torchvision_checkpoint_serves_with_its_labels(tmp_path, weights_dir, photos, runtime):
    model, path = _finetuned(tmp_path)
    labels = [f"breed {i}" for i in range(10)]
    (tmp_path / "pets.labels.txt").write_text("\n".join(labels) + "\n")
    with _serve(weights_dir, "resnet18v1", f"pets={path}", runtime=runtime) as client:
        info = client.get("/models/pets").json()
        answer = client.post("/pets/predict?topk=10", **upload(photos["kitten.jpg"])).json()["prediction"][0]
        names = [m["name"] for m in client.get("/models").json()["models"]]
    assert names == ["resnet18v1", "pets"]
    assert (info["family"], info["architecture"], info["num_classes"]) == ("torchvision", "resnet18", 10)
    assert info["label_source"] == "file pets.labels.txt" and info["preprocessing"]["preset"] == "torchvision"
    assert info["weights"]["file"] == path.name and len(info["weights"]["sha256"]) == 64
    transform = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(photos["kitten.jpg"]))).convert("RGB")
    with torch.inference_mode():
        expected = torch.softmax(model(transform(image).unsqueeze(0)), dim=1)[0]
    for entry in answer:
        assert abs(entry["probability"] - expected[labels.index(entry["class"])].item()) < 1e-5


def test_without_labels_the_classes_are_indices_and_say_so(tmp_path, photos):
    _, path = _finetuned(tmp_path, classes=7)
    with _serve(tmp_path, f"seven={path}") as client:
        info = client.get("/models/seven").json()
        answer = client.post("/seven/predict", **upload(photos["coffee.jpg"])).json()["prediction"][0]
    assert info["label_source"] == "none given: class indices 0-6"
    assert len(answer) == 5 and all(entry["class"] in {str(i) for i in range(7)} for entry in answer)


def test_labels_of_the_wrong_count_name_both_counts(tmp_path):
    _, path = _finetuned(tmp_path)
    (tmp_path / "pets.labels.txt").write_text("a\nb\nc\n")
    settings = Settings(models=(f"pets={path}",), weights_dir=tmp_path, device="cpu", runtime="torch").resolve(
        on_gpu=False
    )
    with pytest.raises(StartupError, match=r"has 3 labels but .* has 10 classes"):
        load_all(settings, torch.device("cpu"))


def test_keys_of_no_family_name_the_closest_and_the_keys(tmp_path):
    state = torchvision.models.resnet34().state_dict()
    state["layer9.weird"] = state.pop("layer2.0.conv1.weight")
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    settings = Settings(models=(f"odd={path}",), weights_dir=tmp_path, device="cpu", runtime="torch").resolve(
        on_gpu=False
    )
    with pytest.raises(StartupError) as raised:
        load_all(settings, torch.device("cpu"))
    message = str(raised.value)
    assert "closest is torchvision's resnet34" in message
    assert "missing: layer2.0.conv1.weight" in message and "unexpected: layer9.weird" in message


def test_a_missing_file_is_one_line(tmp_path):
    settings = Settings(models=(f"gone={tmp_path / 'gone.pth'}",), weights_dir=tmp_path, device="cpu")
    with pytest.raises(StartupError, match="gone.pth is not a file; check the path in --models"):
        load_all(settings.resolve(on_gpu=False), torch.device("cpu"))
