"""benchmarks/torchserve.py's pieces that need no TorchServe running: the archive's inputs serve
the same network as resnet-serve's weights, the archiver's arguments, the config, the ratios."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import zipfile

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from benchmarks import torchserve


@pytest.fixture
def inputs(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    weights = tmp_path / "resnet18v1.safetensors"
    save_file(reference.state_dict(), weights)
    return reference, torchserve.write_archive_inputs(weights, tmp_path)


def test_the_archive_inputs_build_the_same_network_as_the_weights(inputs):
    reference, files = inputs
    # What TorchServe's base handler does: the one class model.py defines, then torch.load.
    spec = importlib.util.spec_from_file_location("model", files.model_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.ImageClassifier().eval()
    model.load_state_dict(torch.load(files.serialized_file, weights_only=True))
    batch = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(model(batch), reference(batch))
    labels = json.loads(files.labels_file.read_text())
    assert len(labels) == 1000 and labels["0"] == "tench" and labels["999"] == "toilet tissue"


def test_the_archiver_packs_the_stock_image_classifier_handler(inputs, tmp_path):
    _, files = inputs
    command = torchserve.archiver_command(torchserve.DEFAULT_VENV / "bin" / "torch-model-archiver", files, tmp_path)
    assert command[command.index("--handler") + 1] == "image_classifier"
    assert command[command.index("--serialized-file") + 1] == str(files.serialized_file)
    if not (torchserve.DEFAULT_VENV / "bin" / "torch-model-archiver").is_file():
        pytest.skip("TorchServe is not installed (scripts/install-torchserve.sh)")
    subprocess.run(command, check=True)
    with zipfile.ZipFile(tmp_path / "resnet18.mar") as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        names = set(mar.namelist())
    assert manifest["model"]["handler"] == "image_classifier" and manifest["model"]["modelName"] == "resnet18"
    assert {"model.py", "resnet18.pth", "index_to_name.json"} <= names


def test_the_config_puts_every_port_on_loopback_and_sets_the_batching():
    ports = {"inference": 1, "management": 2, "metrics": 3, "grpc_inference": 4, "grpc_management": 5}
    text = torchserve.config_properties(torchserve.TorchServeConfig(workers=2, batch_size=4), ports)
    properties = dict(line.split("=", 1) for line in text.splitlines())
    assert properties["inference_address"] == "http://127.0.0.1:1"
    assert properties["grpc_management_address"] == "127.0.0.1" and properties["grpc_management_port"] == "5"
    assert properties["cpu_launcher_enable"] == "false"
    model = json.loads(properties["models"])["resnet18"]["1.0"]
    assert (model["batchSize"], model["minWorkers"], model["maxWorkers"]) == (4, 2, 2)


@pytest.mark.parametrize(("workers", "cpus", "threads"), [(1, 2, 2), (2, 2, 1), (3, 2, 1), (2, 8, 4)])
def test_worker_threads_share_the_cores(workers, cpus, threads):
    assert torchserve.worker_threads(workers, cpus) == threads


def test_ratios_divide_each_level_of_ours_by_torchserve():
    summaries = [
        {"level": 1, "throughput_img_s": 30.0}, {"level": 1, "throughput_img_s": 20.0},
        {"level": 16, "throughput_img_s": 35.0}, {"level": 16, "throughput_img_s": 0.0},
    ]  # fmt: skip
    (one, one_ratio), (sixteen, sixteen_ratio) = torchserve.ratios(summaries)
    assert (one, one_ratio, sixteen) == (1.0, 1.5, 16.0)
    assert sixteen_ratio != sixteen_ratio  # NaN: TorchServe served nothing
