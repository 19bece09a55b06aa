"""mmpretrain itself as the reference: seeded random checkpoints in its own format, its forward and
features, and its own test pipeline on a JPEG.

Checkpoints are written as mmengine writes published ones (its `save_checkpoint` is `torch.save` of
`{"meta": ..., "state_dict": ...}`), with numpy objects in `meta` as real files carry them.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

with warnings.catch_warnings():
    # mmcv-lite says on import that it lacks full mmcv's compiled ops, which no ResNet uses
    warnings.filterwarnings("ignore", message="Fail to import ``MultiScaleDeformableAttention``")
    import mmengine
    import mmpretrain
    from mmcv import imread
    from mmengine.config import Config
    from mmengine.runner.checkpoint import get_state_dict, weights_to_cpu
    from mmpretrain.registry import MODELS, TRANSFORMS
    from mmpretrain.utils import register_all_modules

register_all_modules(init_default_scope=True)

CONFIGS = Path(mmpretrain.__file__).parent / ".mim" / "configs"
_PEAK_PROBABILITY = 0.9  # the top-1 probability every probe image reaches after the head is scaled


@contextlib.contextmanager
def _no_default_init() -> Iterator[None]:
    """Convolutions and linear layers keep their memory as allocated: the callers overwrite every
    weight, and torch's default init of a ResNet-152 costs seconds of CPU. (mmpretrain's ResNet cannot
    be built on the meta device: it calls `.item()` while sizing its drop-path rates.)"""
    saved = _ConvNd.reset_parameters, nn.Linear.reset_parameters
    _ConvNd.reset_parameters = nn.Linear.reset_parameters = lambda self: None  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        _ConvNd.reset_parameters, nn.Linear.reset_parameters = saved  # type: ignore[method-assign]


def build_mm_classifier(backbone: str, depth: int, num_classes: int, **backbone_kwargs: Any) -> nn.Module:
    """mmpretrain's ImageClassifier: the backbone, a GlobalAveragePooling neck and a LinearClsHead.
    Its conv and linear weights are left uninitialised, for the caller to fill or load."""
    expansion = backbone_kwargs.get("expansion", 1 if depth in (18, 34) else 4)
    feature_dim = backbone_kwargs.get("base_channels", 64) * expansion * 8  # the last stage's width
    with _no_default_init():
        model = MODELS.build(
            {
                "type": "ImageClassifier",
                "backbone": {"type": backbone, "depth": depth, **backbone_kwargs},
                "neck": {"type": "GlobalAveragePooling"},
                "head": {"type": "LinearClsHead", "num_classes": num_classes, "in_channels": feature_dim},
            }
        )
    assert isinstance(model, nn.Module)
    return model


def make_mm_checkpoint(
    directory: Path,
    backbone: str,
    depth: int,
    num_classes: int,
    *,
    seed: int = 0,
    peaked: bool = True,
    file_name: str | None = None,
    probe: torch.Tensor | None = None,
    input_size: int | None = None,
    **backbone_kwargs: Any,
) -> tuple[nn.Module, Path]:
    """A seeded random mmpretrain classifier (eval, CPU) and the `.pth` it was saved to.

    Every weight and BN statistic is random (mmpretrain's own init zeroes the last BN of each block,
    which would hide a wrong block). With `peaked`, the head is centred on the probe's mean feature
    and scaled until each probe image's top-1 probability is at least 0.9 (the least of them about
    0.9). The probe is by default two seeded smooth random images of `input_size` (default 32 for
    ResNet_CIFAR, else 224); pass real photos, normalised as the server will, to get distinct,
    confident answers on them."""
    generator = torch.Generator().manual_seed(seed)
    model = build_mm_classifier(backbone, depth, num_classes, **backbone_kwargs)
    _randomise(model, generator)
    model.eval()  # not chained: mmpretrain's ResNet.eval() returns None
    if peaked:
        size = input_size or (32 if backbone == "ResNet_CIFAR" else 224)
        if probe is None:  # smooth colour fields: white noise pools to nearly one feature vector
            coarse = torch.randn(2, 3, 7, 7, generator=generator) * 1.5
            probe = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        _peak_head(model, probe, generator)
    name = file_name or f"{backbone.lower()}{depth}_{num_classes}c_seed{seed}.pth"
    path = directory / name
    meta = {
        "epoch": 100,
        "iter": 500_400,
        "seed": np.int64(seed),
        "mmengine_version": mmengine.__version__,
        "time": "20260101_000000",
        "dataset_meta": {"classes": tuple(f"class {i}" for i in range(num_classes))},
        # as hooks leave them in real files: numpy scalars and arrays
        "hook_msgs": {"best_score": np.float64(0.5), "last_ckpt": str(path)},
        "img_norm_cfg": {"mean": np.array([123.675, 116.28, 103.53], dtype=np.float32), "to_rgb": np.bool_(True)},
    }
    # what mmengine's save_checkpoint writes for a published file, through torch.save directly (its
    # file-client layer only adds deprecation notices)
    torch.save({"meta": meta, "state_dict": weights_to_cpu(get_state_dict(model))}, path)
    return model, path


def mm_reference_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(x, mode="tensor")
    assert isinstance(logits, torch.Tensor)
    return logits


def mm_reference_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and features from one forward: `model(x, mode="tensor")` is `head(extract_feat(x))`,
    and the neck's output, caught on the way, is what `extract_feat` returns."""
    caught: list[torch.Tensor] = []
    handle = model.neck.register_forward_hook(lambda _m, _i, output: caught.append(output))  # type: ignore[union-attr]
    try:
        logits = mm_reference_logits(model, x)
    finally:
        handle.remove()
    (features,) = caught
    return logits, features[-1] if isinstance(features, tuple) else features


def mm_reference_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What mmpretrain's `extract_feat` returns: the GlobalAveragePooling neck's output."""
    with torch.inference_mode():
        features = model.extract_feat(x)  # type: ignore[operator]
    return features[-1] if isinstance(features, tuple) else features


def mm_config(config_name: str) -> Config:
    matches = sorted(CONFIGS.glob(f"*/{config_name}.py"))
    if not matches:
        raise FileNotFoundError(f"mmpretrain ships no config named {config_name}")
    return Config.fromfile(str(matches[0]))


def mm_pipeline_input(config_name: str, jpeg_path: Path) -> torch.Tensor:
    """The (1, 3, H, W) float tensor mmpretrain's test pipeline and data preprocessor make of the file."""
    config = mm_config(config_name)
    steps = list(config.test_dataloader.dataset.pipeline)
    sample: dict[str, Any] = {"img_path": str(jpeg_path)}
    if steps[0]["type"] != "LoadImageFromFile":
        # CIFAR: the dataset hands the pipeline RGB arrays, and no step loads or resizes a file, so
        # the image goes in as the dataset would give it, at its own size. (mmpretrain's inferencer
        # would read it with imread, i.e. in BGR, into a net trained on RGB: a quirk we do not copy.)
        image = imread(str(jpeg_path), channel_order="rgb")
        sample = {"img": image, "img_shape": image.shape[:2], "ori_shape": image.shape[:2]}
    pipeline = [TRANSFORMS.build(step) for step in steps]
    for transform in pipeline:
        sample = transform(sample)
    preprocessor = MODELS.build({"type": "ClsDataPreprocessor", **config.data_preprocessor})
    batch = preprocessor({"inputs": [sample["inputs"]], "data_samples": [sample["data_samples"]]}, training=False)
    inputs = batch["inputs"]
    assert isinstance(inputs, torch.Tensor)
    return inputs.float()


def _randomise(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "num_batches_tracked":
                tensor.fill_(1000)
            elif tensor.ndim == 4:  # conv: He normal keeps the activations' scale through the stages
                fan_in = tensor.shape[1] * tensor.shape[2] * tensor.shape[3]
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * math.sqrt(2.0 / fan_in))
            elif tensor.ndim == 2:  # the head
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(tensor.shape[1]))
            elif leaf in ("weight", "running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.8 + 0.6)
            else:  # BN bias and running_mean, the head's bias
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)


def _peak_head(model: nn.Module, probe: torch.Tensor, generator: torch.Generator) -> None:
    """Centre the head on the probe's mean feature and scale it until each probe's top-1 is ~0.9."""
    features = mm_reference_features(model, probe)
    fc = model.head.fc  # type: ignore[union-attr]
    weight = torch.randn(fc.weight.shape, generator=generator) / math.sqrt(fc.weight.shape[1])
    centre = features.mean(0) if len(features) > 1 else torch.zeros_like(features[0])
    low, high = 0.0, 1.0
    while _min_top1(weight * high, centre, features) < _PEAK_PROBABILITY and high < 1e6:
        low, high = high, high * 2
    for _ in range(30):  # bisect the scale to land close to the target probability
        middle = (low + high) / 2
        low, high = (
            (middle, high) if _min_top1(weight * middle, centre, features) < _PEAK_PROBABILITY else (low, middle)
        )
    with torch.no_grad():
        fc.weight.copy_(weight * high)
        fc.bias.copy_(-(weight * high) @ centre)


def _min_top1(weight: torch.Tensor, centre: torch.Tensor, features: torch.Tensor) -> float:
    probabilities = torch.softmax((features - centre) @ weight.T, dim=1)
    return float(probabilities.max(dim=1).values.min())
