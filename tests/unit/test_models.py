"""Catalog, weights files, labels and the runner: no server involved."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from service.config import MissingWeightsPolicy, Settings
from service.cores import usable_cpus
from service.errors import InsufficientStorage, StartupError
from service.imaging import Preprocessing
from service.models.catalog import CATALOG, find_spec
from service.models.labels import imagenet_labels, labels_for
from service.models.registry import obtain_weights, resolve_specs
from service.models.runner import ModelRunner
from service.models.weights import (
    Origin,
    build_model,
    classify,
    download,
    fetch_official,
    find_weights,
    read_state_dict,
    verify,
    write_random,
)
from service.postprocessing import top_k
from tests.conftest import SYNSETS
from tests.unit.conftest import OneFile

ALL_NAMES = [
    "resnet18v1", "resnet34v1", "resnet50v1", "resnet101v1", "resnet152v1", "wide_resnet50_2",
    "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
]  # fmt: skip


def test_catalog_has_every_depth_and_variant():
    assert sorted(CATALOG) == sorted(ALL_NAMES)
    for depth in (18, 34, 50, 101, 152):
        assert find_spec(f"resnet{depth}") is CATALOG[f"resnet{depth}v1"]
    assert find_spec("resnet19") is None


def test_official_files_come_from_torchvision():
    r18 = CATALOG["resnet18v1"].default_weights
    assert r18.filename == "resnet18-f37072fd.pth"
    assert r18.sha256_prefix == "f37072fd"
    r50 = CATALOG["resnet50v1"].default_weights
    assert r50.filename == "resnet50-11ad3fa6.pth"
    assert r50.preprocessing.resize_size == 232
    for spec in CATALOG.values():
        assert spec.default_weights.url.startswith("https://download.pytorch.org/models/")


def test_labels_match_the_shared_synsets_and_torchvision_order():
    labels = imagenet_labels()
    assert list(labels) == SYNSETS.read_text().strip().splitlines()
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert labels[281].startswith("n02123045 tabby") and categories[281] == "tabby"


def test_random_weights_round_trip_and_are_marked(tmp_path):
    spec = CATALOG["resnet18v1"]
    path = write_random(spec, 7, tmp_path)
    found = find_weights(spec, tmp_path)
    assert found is not None and found.path == path
    assert found.origin is Origin.RANDOM_INIT and found.seed == 7
    torch.manual_seed(7)
    expected = torchvision.models.resnet18()
    assert torch.equal(load_file(path)["conv1.weight"], expected.state_dict()["conv1.weight"])


def test_plain_pth_and_ddp_prefixes_load(tmp_path):
    spec = CATALOG["resnet18v1"]
    state = torchvision.models.resnet18().state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "resnet18.pth")
    weights = find_weights(spec, tmp_path)
    assert weights is not None and weights.origin is Origin.USER
    model = build_model(spec, weights)
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])


def test_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "resnet18v1.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "evil": object()}, path)
    with pytest.raises(StartupError, match="plain-tensor"):
        read_state_dict(path)


def test_truncated_or_corrupt_files_stop_startup(tmp_path):
    spec = CATALOG["resnet18v1"]
    good = write_random(spec, 0, tmp_path)
    good.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(StartupError, match="not a readable checkpoint"):
        build_model(spec, classify(spec, good))


def test_wrong_architecture_names_the_file(tmp_path):
    spec = CATALOG["resnet34v1"]
    path = tmp_path / "resnet34v1.safetensors"
    write_random(CATALOG["resnet18v1"], 0, tmp_path).rename(path)
    with pytest.raises(StartupError, match=r"resnet34v1\.safetensors does not fit the resnet34"):
        build_model(spec, classify(spec, path))


def test_official_name_with_wrong_hash_is_refused(tmp_path):
    spec = CATALOG["resnet18v1"]
    impostor = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18().state_dict(), impostor)
    weights = find_weights(spec, tmp_path)
    assert weights is not None and weights.origin is Origin.OFFICIAL
    with pytest.raises(StartupError, match="name says f37072fd.*resnet-serve weights fetch"):
        verify(weights)


def test_missing_weights_fail_with_the_command_that_gets_them(tmp_path):
    settings = Settings(weights_dir=tmp_path)
    with pytest.raises(StartupError, match="resnet-serve weights fetch resnet18v1"):
        obtain_weights(CATALOG["resnet18v1"], settings)


def test_fetch_or_random_falls_back_to_random_when_offline(tmp_path):
    settings = Settings(
        weights_dir=tmp_path,
        missing_weights=MissingWeightsPolicy.FETCH_OR_RANDOM,
        random_seed=3,
        weights_base_url="http://127.0.0.1:9/",  # the discard port: nothing listens
    )
    weights = obtain_weights(CATALOG["resnet18v1"], settings)
    assert weights.origin is Origin.RANDOM_INIT
    assert weights.seed == 3


def test_fetch_policy_without_network_stops_startup(tmp_path):
    settings = Settings(
        weights_dir=tmp_path, missing_weights=MissingWeightsPolicy.FETCH, weights_base_url="http://127.0.0.1:9/"
    )
    with pytest.raises(StartupError, match="could not fetch the weights of resnet18v1"):
        obtain_weights(CATALOG["resnet18v1"], settings)


def test_unknown_model_names_list_the_known_ones():
    with pytest.raises(StartupError, match="known models:.*resnet18v1"):
        resolve_specs(("resnet18v1", "vgg16"))


def test_custom_class_count_needs_a_labels_file(tmp_path):
    weights = tmp_path / "resnet18v1.pth"
    with pytest.raises(StartupError, match=r"resnet18v1\.labels\.txt"):
        labels_for("resnet18v1", weights, 10)
    (tmp_path / "resnet18v1.labels.txt").write_text("\n".join(f"class{i}" for i in range(9)))
    with pytest.raises(StartupError, match="9 labels but"):
        labels_for("resnet18v1", weights, 10)
    (tmp_path / "resnet18v1.labels.txt").write_text("\n".join(f"class{i}" for i in range(10)))
    assert labels_for("resnet18v1", weights, 10)[9] == "class9"


def test_download_verifies_the_hash_and_writes_atomically(tmp_path, file_server):
    OneFile.body = b"checkpoint bytes" * 1000
    digest = hashlib.sha256(OneFile.body).hexdigest()
    url = f"http://127.0.0.1:{file_server.server_address[1]}/x.pth"
    target = tmp_path / "x.pth"
    assert download(url, target, sha256_prefix=digest[:8]) == target
    assert target.read_bytes() == OneFile.body
    with pytest.raises(ValueError, match="corrupt"):
        download(url, tmp_path / "y.pth", sha256_prefix="00000000")
    assert not (tmp_path / "y.pth").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["x.pth"]  # no partial file left behind


def test_fetch_rejects_a_corrupted_official_download(tmp_path, file_server):
    OneFile.body = b"not the real resnet18"
    base = f"http://127.0.0.1:{file_server.server_address[1]}/"
    with pytest.raises(ValueError, match="does not start with f37072fd"):
        fetch_official(CATALOG["resnet18v1"], tmp_path, base_url=base)
    assert list(tmp_path.iterdir()) == []


def test_runner_probabilities_match_a_plain_forward(weights_dir):
    spec = CATALOG["resnet18v1"]
    weights = find_weights(spec, weights_dir)
    assert weights is not None
    runner = ModelRunner.with_torch(build_model(spec, weights), Preprocessing(), device=torch.device("cpu"))
    images = [torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8) for _ in range(3)]
    got = runner.predict(images)
    reference = torchvision.models.resnet18()
    reference.load_state_dict(load_file(weights.path))
    reference.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = torch.softmax(reference((torch.stack(images).float() / 255 - mean) / std), dim=1)
    assert len(got) == 3
    assert torch.allclose(torch.stack(got), expected, atol=1e-5, rtol=0)


def test_top_k_is_sorted_and_labelled():
    probabilities = torch.tensor([0.1, 0.5, 0.15, 0.25])
    scores = top_k(probabilities, ["a", "b", "c", "d"], 3)
    assert [(s.label, round(s.probability, 2)) for s in scores] == [("b", 0.5), ("d", 0.25), ("c", 0.15)]
    with pytest.raises(ValueError, match="expected 1 probabilities"):
        top_k(probabilities, ["a"], 1)


def test_settings_resolve_device_defaults_and_keep_explicit_values():
    cpu = Settings().resolve(on_gpu=False)
    gpu = Settings().resolve(on_gpu=True)
    assert cpu.max_batch_size == 8 and gpu.max_batch_size == 64
    assert cpu.max_queue_size == 64
    explicit = Settings(max_batch_size=3, max_queue_size=5).resolve(on_gpu=True)
    assert (explicit.max_batch_size, explicit.max_queue_size) == (3, 5)


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("RESNET_SERVE_MODELS", "resnet18v1, resnet50v1")
    monkeypatch.setenv("RESNET_SERVE_MAX_BATCH_SIZE", "16")
    settings = Settings()
    assert settings.models == ("resnet18v1", "resnet50v1")
    assert settings.max_batch_size == 16


def test_settings_reject_nonsense():
    with pytest.raises(ValueError, match="max_batch_size"):
        Settings(max_batch_size=0)
    with pytest.raises(ValueError, match="device"):
        Settings(device="tpu")


def test_weights_dir_default_is_relative_to_the_working_directory():
    assert Settings().weights_dir == Path("weights")


class _RunsOutOfMemory(torch.nn.Module):
    """Raises CUDA's out-of-memory error for batches above `limit` images."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.fc = torch.nn.Linear(3, 4)
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.fc(x.mean(dim=(2, 3)))


def test_out_of_memory_splits_the_batch_and_keeps_the_order():
    model = _RunsOutOfMemory(limit=2)
    runner = ModelRunner.with_torch(model, Preprocessing(crop_size=8), device=torch.device("cpu"), channels_last=False)
    images = [torch.full((3, 8, 8), i, dtype=torch.uint8) for i in range(5)]
    split = runner.predict(images)
    model.limit = 99
    whole = runner.predict(images)
    assert torch.allclose(torch.stack(split), torch.stack(whole), atol=1e-6)
    assert model.batch_sizes[:5] == [5, 3, 2, 1, 2]  # 5 fails, 3 fails, then 2+1 and 2


def test_out_of_memory_on_a_single_image_is_insufficient_storage():
    runner = ModelRunner.with_torch(_RunsOutOfMemory(limit=0), Preprocessing(crop_size=8), device=torch.device("cpu"))
    with pytest.raises(InsufficientStorage):
        runner.predict([torch.zeros(3, 8, 8, dtype=torch.uint8)] * 2)


def test_workers_share_the_cores_between_their_threads():
    cores = usable_cpus()
    alone = Settings().resolve(on_gpu=False)
    two = Settings(workers=2).resolve(on_gpu=False)
    assert alone.torch_threads == cores
    assert two.torch_threads == max(1, cores // 2)
    with pytest.raises(ValueError, match="workers"):
        Settings(workers=0)
