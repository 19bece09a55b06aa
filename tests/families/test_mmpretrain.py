"""mmpretrain's ResNet checkpoints, loaded our way, against mmpretrain itself.

Each reference is an ImageClassifier built by mmpretrain with seeded random weights (BN statistics
too) and a head scaled until softmax is peaked, saved as mmengine saves it (numpy objects in `meta`).
Our side reads the file (`read_state_dict`), recognises the architecture from the keys and shapes and
builds a torchvision module; on the same input, logits, probabilities and pooled features agree.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import skimage.data
import torch
from PIL import Image
from torch import nn

from service.errors import StartupError
from service.models.families.mmpretrain import MmResNetArch, build, looks_like_mmpretrain, recognise
from service.models.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx
from service.models.weights import read_state_dict
from tests.conftest import KITTEN
from tests.families.mm_reference import (
    CONFIGS,
    MODELS,
    build_mm_classifier,
    make_mm_checkpoint,
    mm_pipeline_input,
    mm_reference_features,
    mm_reference_logits,
    mm_reference_outputs,
)

pytestmark = pytest.mark.families

TOLERANCE = 1e-5
IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
CIFAR100_MEAN, CIFAR100_STD = (129.304, 124.070, 112.434), (68.170, 65.392, 70.418)


def _wide_backbone_kwargs() -> dict[str, Any]:
    """The backbone settings of mmpretrain's own wide-resnet50 model config, less type and depth."""
    from mmengine.config import Config

    backbone = dict(Config.fromfile(str(CONFIGS / "_base_/models/wide-resnet50.py")).model.backbone)
    return {k: v for k, v in backbone.items() if k not in ("type", "depth")}


@dataclass(frozen=True)
class Case:
    backbone: str
    depth: int
    num_classes: int
    size: int
    name: str
    feature_dim: int
    base_channels: int = 64
    wide: bool = False


CASES = {
    "resnet18": Case("ResNet", 18, 1000, 224, "ResNet-18", 512),
    "resnet50": Case("ResNet", 50, 1000, 224, "ResNet-50", 2048),
    "resnetv1c50": Case("ResNetV1c", 50, 1000, 224, "ResNetV1c-50", 2048),
    "resnetv1d50": Case("ResNetV1d", 50, 1000, 224, "ResNetV1d-50", 2048),
    "cifar10-resnet18": Case("ResNet_CIFAR", 18, 10, 32, "ResNet_CIFAR-18", 512),
    "cifar100-resnet50": Case("ResNet_CIFAR", 50, 100, 32, "ResNet_CIFAR-50", 2048),
    "wide-resnet50": Case("ResNet", 50, 1000, 224, "WideResNet-50-2", 2048, base_channels=128, wide=True),
    "cub-resnet50-448": Case("ResNet", 50, 200, 448, "ResNet-50", 2048),
}


@dataclass
class Loaded:
    reference: nn.Module
    path: Path
    state_dict: dict[str, torch.Tensor]
    x: torch.Tensor
    ours: nn.Module


def _photos(size: int) -> torch.Tensor:
    """Two real photos, resized and normalised: inputs whose features differ as real ones do (noise
    images pool to nearly the same features, which a peaked head must then amplify)."""
    arrays = [skimage.data.chelsea(), skimage.data.coffee()]
    resized = [np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BILINEAR)) for a in arrays]
    batch = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float()
    return (batch - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Each case's checkpoint is made and loaded once, for every test that asks for it."""
    cache: dict[str, Loaded] = {}
    directory = tmp_path_factory.mktemp("mm")

    def get(case_id: str) -> Loaded:
        if case_id not in cache:
            case = CASES[case_id]
            x = _photos(case.size)
            kwargs = _wide_backbone_kwargs() if case.wide else {}
            reference, path = make_mm_checkpoint(
                directory, case.backbone, case.depth, case.num_classes, seed=3, probe=x, **kwargs
            )
            state_dict = read_state_dict(path)
            ours = build(recognise(state_dict, path), state_dict, path)
            cache[case_id] = Loaded(reference, path, state_dict, x, ours)
        return cache[case_id]

    return get


def _outputs(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our logits and the pooled features entering `fc`, from one forward."""
    caught: list[torch.Tensor] = []
    handle = module.fc.register_forward_hook(lambda _m, inputs, _o: caught.append(inputs[0]))
    try:
        with torch.inference_mode():
            logits = module(x)
    finally:
        handle.remove()
    return logits, caught[0]


@pytest.mark.parametrize("case_id", list(CASES))
def test_logits_probabilities_and_features_equal_mmpretrain(case_id, loaded):
    case = CASES[case_id]
    run = loaded(case_id)
    assert looks_like_mmpretrain(run.state_dict)
    arch = recognise(run.state_dict, run.path)
    assert arch == MmResNetArch(case.backbone, case.depth, case.num_classes, case.base_channels)
    assert (arch.name, arch.feature_dim, arch.input_size) == (case.name, case.feature_dim, min(case.size, 224))

    expected, expected_features = mm_reference_outputs(run.reference, run.x)
    probabilities = torch.softmax(expected, dim=1)
    assert bool((probabilities.max(dim=1).values >= 0.5).all()), "the reference is not peaked"
    assert not run.ours.training
    logits, features = _outputs(run.ours, run.x)
    assert logits.shape == (2, case.num_classes)
    assert (logits - expected).abs().max().item() <= TOLERANCE
    assert (torch.softmax(logits, dim=1) - probabilities).abs().max().item() <= TOLERANCE
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    assert features.shape == expected_features.shape == (2, case.feature_dim)
    assert (features - expected_features).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("case_id", ["resnet18", "resnetv1d50", "cifar10-resnet18", "cifar100-resnet50"])
def test_without_its_head_the_module_returns_extract_feat(case_id, loaded):
    run = loaded(case_id)
    head = run.ours.fc
    assert isinstance(head, nn.Linear)
    try:
        run.ours.fc = nn.Identity()
        with torch.inference_mode():
            features = run.ours(run.x)
    finally:
        run.ours.fc = head
    expected = mm_reference_features(run.reference, run.x)  # extract_feat itself
    assert features.shape == expected.shape == (2, CASES[case_id].feature_dim)
    assert (features - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("case_id", ["resnetv1d50", "cifar10-resnet18"])
def test_the_module_exports_to_onnx_and_onnxruntime_agrees(case_id, loaded):
    run = loaded(case_id)
    size = run.x.shape[-1]
    data = export_onnx(run.ours, input_size=size, model=case_id)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: run.x.numpy()})  # a batch of 2: the batch axis is dynamic
    with torch.inference_mode():
        logits = run.ours(run.x)
    scale = logits.abs().max().item()
    assert np.abs(onnx_logits - logits.numpy()).max() <= 1e-4 * max(1.0, scale)
    assert np.array_equal(onnx_logits.argmax(1), logits.argmax(1).numpy())


@pytest.mark.parametrize(
    ("backbone", "depth", "kwargs", "name"),
    [
        ("ResNet", 34, {}, "ResNet-34"),
        ("ResNet", 101, {}, "ResNet-101"),
        ("ResNet", 152, {}, "ResNet-152"),
        ("ResNetV1c", 101, {}, "ResNetV1c-101"),
        ("ResNetV1c", 152, {}, "ResNetV1c-152"),
        ("ResNetV1d", 101, {}, "ResNetV1d-101"),
        ("ResNetV1d", 152, {}, "ResNetV1d-152"),
        ("ResNet_CIFAR", 34, {}, "ResNet_CIFAR-34"),
        ("ResNet_CIFAR", 101, {}, "ResNet_CIFAR-101"),
        ("ResNet_CIFAR", 152, {}, "ResNet_CIFAR-152"),
        ("ResNet", 101, "wide", "WideResNet-101-2"),
    ],
)
def test_deeper_variants_are_recognised_from_shapes(backbone, depth, kwargs, name):
    """Shapes only: mmpretrain builds them, uninitialised, and nothing runs a forward."""
    backbone_kwargs = _wide_backbone_kwargs() if kwargs == "wide" else kwargs
    model = build_mm_classifier(backbone, depth, 21843, **backbone_kwargs)
    arch = recognise(model.state_dict(), Path("deep.pth"))
    base = 128 if kwargs == "wide" else 64
    assert arch == MmResNetArch(backbone, depth, 21843, base)
    assert (arch.name, arch.feature_dim) == (name, 2048 if depth > 34 else 512)


def _meta_state_dict(backbone: str, depth: int, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    return dict(build_mm_classifier(backbone, depth, num_classes).state_dict())


def _one_line_error(state_dict: dict[str, torch.Tensor]) -> str:
    with pytest.raises(StartupError) as caught:
        recognise(state_dict, Path("broken.pth"))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("broken.pth ")
    return message


def test_a_renamed_key_names_the_closest_variant_and_the_key():
    state_dict = _meta_state_dict("ResNetV1d", 50)
    state_dict["backbone.layer3.2.conv_2.weight"] = state_dict.pop("backbone.layer3.2.conv2.weight")
    message = _one_line_error(state_dict)
    assert "closest is ResNetV1d-50 (1000 classes)" in message
    assert "missing: backbone.layer3.2.conv2.weight" in message
    assert "unexpected: backbone.layer3.2.conv_2.weight" in message


def test_a_missing_key_and_a_wrong_shape_are_named():
    state_dict = _meta_state_dict("ResNet_CIFAR", 18, num_classes=10)
    del state_dict["head.fc.bias"]
    state_dict["backbone.layer2.0.conv1.weight"] = torch.empty(100, 64, 3, 3)
    message = _one_line_error(state_dict)
    assert "closest is ResNet_CIFAR-18 (10 classes)" in message
    assert "missing: head.fc.bias" in message
    assert "wrong shape: backbone.layer2.0.conv1.weight (100, 64, 3, 3) vs (128, 64, 3, 3)" in message


def test_a_non_resnet_state_dict_is_refused_in_one_line():
    model = MODELS.build(
        {
            "type": "ImageClassifier",
            "backbone": {"type": "MobileNetV2", "widen_factor": 0.5},
            "neck": {"type": "GlobalAveragePooling"},
            "head": {"type": "LinearClsHead", "num_classes": 1000, "in_channels": 1280},
        }
    )
    state_dict = dict(model.state_dict())
    assert looks_like_mmpretrain(state_dict)
    message = _one_line_error(state_dict)
    assert "is not an mmpretrain ResNet checkpoint: the closest is" in message
    assert "unexpected: backbone.conv1.conv.weight" in message
    assert not looks_like_mmpretrain({"conv1.weight": torch.empty(64, 3, 7, 7), "fc.weight": torch.empty(10, 512)})


def test_build_refuses_a_state_dict_of_another_variant(loaded):
    run = loaded("cifar10-resnet18")
    with pytest.raises(StartupError, match=r"^\S+ does not fit ResNet-18 \(10 classes\): wrong shape: backbone\.conv1"):
        build(MmResNetArch("ResNet", 18, 10), run.state_dict, run.path)


def test_half_precision_and_counterless_checkpoints_load_as_float32(loaded, tmp_path):
    """fp16 files (as some fp16-trained releases are) and converted files without BN step counters."""
    run = loaded("cifar10-resnet18")
    half = {k: v.half() if v.is_floating_point() else v for k, v in run.state_dict.items()}
    half = {k: v for k, v in half.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "half.pth"
    torch.save({"meta": {"fp16": np.bool_(True)}, "state_dict": half}, path)
    state_dict = read_state_dict(path)
    ours = build(recognise(state_dict, path), state_dict, path)
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    reference = build_mm_classifier("ResNet_CIFAR", 18, 10)
    reference.load_state_dict({k: v.float() for k, v in half.items()}, strict=False)
    reference.eval()
    with torch.inference_mode():
        assert (ours(run.x) - mm_reference_logits(reference, run.x)).abs().max().item() <= TOLERANCE


def test_numpy_in_meta_loads_though_plain_weights_only_refuses_it(loaded):
    run = loaded("cifar10-resnet18")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(run.path, weights_only=True)  # what mmengine's load_checkpoint trips on
    assert "head.fc.weight" in read_state_dict(run.path)


_TRIPPED: list[str] = []


def _trip(*args: object) -> None:
    _TRIPPED.append("called")


class Tripwire:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_trip, ())


@pytest.mark.parametrize(
    ("meta", "named"),
    [
        (Tripwire(), "Unsupported global: GLOBAL tests.families.test_mmpretrain._trip"),
        (np.array([Tripwire()], dtype=object), "ObjectDType"),
        (np.array(["a", 1], dtype=object), "ObjectDType"),
    ],
    ids=["custom-object", "object-array-of-objects", "object-array"],
)
def test_other_globals_are_refused_in_one_line_and_never_called(meta, named, tmp_path):
    path = tmp_path / "evil.pth"
    buffer = io.BytesIO()
    torch.save({"meta": meta, "state_dict": {"head.fc.weight": torch.zeros(2, 2)}}, buffer)
    path.write_bytes(buffer.getvalue())
    _TRIPPED.clear()
    with pytest.raises(StartupError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert "\n" not in message and "is not a plain-tensor checkpoint" in message and named in message
    assert _TRIPPED == []


def _by_hand(rgb: np.ndarray, config_name: str) -> np.ndarray:
    """The test pipelines as the shipped configs spell them, written out with cv2 and PIL directly."""
    import cv2

    height, width = rgb.shape[:2]
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if config_name == "resnet50_8xb16_cifar100":  # no resize, no crop: the image as the dataset gives it
        mean, std, crop = CIFAR100_MEAN, CIFAR100_STD, None
    elif config_name == "resnet50_8xb8_cub":  # Resize(scale=600): both sides, aspect ignored
        rgb, crop = cv2.resize(rgb, (600, 600), interpolation=cv2.INTER_LINEAR), 448
    else:  # ResizeEdge: the short side to the scale, the long one truncated
        scale = 236 if "rsb" in config_name else 256
        size = (scale, int(scale * height / width)) if width < height else (int(scale * width / height), scale)
        if "rsb" in config_name:
            rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))
        else:
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)
        crop = 224
    if crop is not None:
        top, left = round((rgb.shape[0] - crop) / 2), round((rgb.shape[1] - crop) / 2)
        rgb = rgb[top : top + crop, left : left + crop]
    return ((rgb.astype(np.float32) - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(2, 0, 1)


@pytest.mark.parametrize(
    "config_name",
    ["resnet50_8xb32_in1k", "resnet50_8xb256-rsb-a1-600e_in1k", "resnet50_8xb8_cub", "resnet50_8xb16_cifar100"],
)
def test_mm_pipeline_input_runs_mmpretrains_own_test_pipeline(config_name):
    import cv2

    tensor = mm_pipeline_input(config_name, KITTEN)
    rgb = cv2.cvtColor(cv2.imread(str(KITTEN), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    expected = _by_hand(rgb, config_name)
    assert tensor.dtype == torch.float32 and tensor.shape == (1, *expected.shape)
    assert np.abs(tensor[0].numpy() - expected).max() <= 1e-4
