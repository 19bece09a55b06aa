"""Each family's evaluation pipeline, as its own configs declare it: resize, crop, mean, std, labels.

A served model names one preset (`NAME=PATH#preset`), or the loader picks one from the file's family,
name and class count (`guess_preset`). docs/models.md says where each differs from the original.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from enum import StrEnum

from service.errors import StartupError
from service.imaging import Interpolation, Preprocessing, ResizeBackend, ResizeMode

# mmpretrain's data_preprocessor constants are on the 0-255 scale; Preprocessing's are on 0-1.
_IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
_IMAGENET_STD_255 = (58.395, 57.12, 57.375)


def _unit(values: tuple[float, float, float]) -> tuple[float, float, float]:
    return (values[0] / 255, values[1] / 255, values[2] / 255)


class LabelSet(StrEnum):
    IMAGENET = "imagenet"  # the 1000 ImageNet-1k synsets
    CIFAR10 = "cifar10"
    CIFAR100 = "cifar100"
    NONE = "none"  # a labels file beside the weights, or class indices


@dataclass(frozen=True)
class Preset:
    name: str
    source: str  # where the pipeline is declared
    preprocessing: Preprocessing
    labels: LabelSet
    multi_label: bool = False  # per-class sigmoid scores instead of a softmax over the classes


_TORCHVISION = Preprocessing()
# mmpretrain's imagenet_bs32.py: ResizeEdge(256, short) with mmcv's default cv2 backend.
_MMPRETRAIN_IN1K = Preprocessing(
    resize_size=256,
    crop_size=224,
    interpolation=Interpolation.BILINEAR,
    antialias=False,
    mean=_unit(_IMAGENET_MEAN_255),
    std=_unit(_IMAGENET_STD_255),
    backend=ResizeBackend.OPENCV,
)
_RSB = Preprocessing(
    resize_size=236,
    crop_size=224,
    interpolation=Interpolation.BICUBIC,
    antialias=True,
    mean=_unit(_IMAGENET_MEAN_255),
    std=_unit(_IMAGENET_STD_255),
    backend=ResizeBackend.PIL,
)


def _cifar(mean: tuple[float, float, float], std: tuple[float, float, float]) -> Preprocessing:
    # CIFAR's pipeline takes 32x32 images as they are; a larger photo is resized like any other.
    return Preprocessing(
        resize_size=32, crop_size=32, mean=_unit(mean), std=_unit(std), mode=ResizeMode.NONE, antialias=True
    )


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "torchvision", "torchvision's ImageClassification (weights.transforms())", _TORCHVISION, LabelSet.IMAGENET
        ),
        Preset(
            "onnx-zoo",
            "the ONNX model zoo's ResNet page (imagenet_preprocess: Resize(256), CenterCrop(224), Normalize)",
            _TORCHVISION,
            LabelSet.IMAGENET,
        ),
        Preset(
            "gluon",
            "the zoo's Gluon validation notebook: Resize(256) (both sides, OpenCV bilinear), CenterCrop(224)",
            Preprocessing(
                resize_size=256, crop_size=224, antialias=False, backend=ResizeBackend.OPENCV, mode=ResizeMode.SQUARE
            ),
            LabelSet.IMAGENET,
        ),
        Preset(
            "mmpretrain-in1k",
            "mmpretrain configs/_base_/datasets/imagenet_bs32.py: ResizeEdge(256, short, cv2), CenterCrop(224)",
            _MMPRETRAIN_IN1K,
            LabelSet.IMAGENET,
        ),
        Preset(
            "mmpretrain-pil",
            "mmpretrain imagenet_bs32_pil_resize.py (the converted wide ResNets): ResizeEdge(256, short, pillow)",
            dataclasses.replace(_MMPRETRAIN_IN1K, backend=ResizeBackend.PIL, antialias=True),
            LabelSet.IMAGENET,
        ),
        Preset(
            "mmpretrain-pil-bicubic",
            "mmpretrain imagenet_bs32_pil_bicubic.py (timm's wide ResNet-50): ResizeEdge(256, short, pillow, bicubic)",
            dataclasses.replace(
                _MMPRETRAIN_IN1K,
                backend=ResizeBackend.PIL,
                antialias=True,
                interpolation=Interpolation.BICUBIC,
            ),
            LabelSet.IMAGENET,
        ),
        Preset(
            "rsb",
            "mmpretrain imagenet_bs256_rsb_a12.py / _a3.py: ResizeEdge(236, short, pillow, bicubic), CenterCrop(224)",
            _RSB,
            LabelSet.IMAGENET,
        ),
        Preset(
            "cub",
            "mmpretrain configs/_base_/datasets/cub_bs8_448.py: Resize(600x600, cv2), CenterCrop(448)",
            Preprocessing(
                resize_size=600,
                crop_size=448,
                antialias=False,
                mean=_unit(_IMAGENET_MEAN_255),
                std=_unit(_IMAGENET_STD_255),
                backend=ResizeBackend.OPENCV,
                mode=ResizeMode.SQUARE,
            ),
            LabelSet.NONE,
        ),
        Preset(
            "mill-in21k",
            "none ships with the checkpoint: Alibaba-MIIL's ImageNet-21K-P convention (pillow bilinear 256, "
            "crop 224, pixels in 0-1 with no mean or std), multi-label sigmoid scores",
            Preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
            LabelSet.NONE,
            multi_label=True,
        ),
        Preset(
            "cifar10",
            "mmpretrain configs/_base_/datasets/cifar10_bs16.py: the 32x32 image as it is",
            _cifar((125.307, 122.961, 113.8575), (51.5865, 50.847, 51.255)),
            LabelSet.CIFAR10,
        ),
        Preset(
            "cifar100",
            "mmpretrain configs/_base_/datasets/cifar100_bs16.py: the 32x32 image as it is",
            _cifar((129.304, 124.070, 112.434), (68.170, 65.392, 70.418)),
            LabelSet.CIFAR100,
        ),
    )
}


def preset_named(name: str, model: str) -> Preset:
    preset = PRESETS.get(name)
    if preset is None:
        raise StartupError(f"{model}: unknown preprocessing preset {name!r}; known: {', '.join(PRESETS)}")
    return preset


# mmpretrain's released file names say which pipeline trained them.
_BY_FILE_NAME = (
    (re.compile(r"wide-resnet.*timm"), "mmpretrain-pil-bicubic"),
    (re.compile(r"wide-resnet"), "mmpretrain-pil"),
    (re.compile(r"resnetv1[cd]"), "mmpretrain-pil"),
    (re.compile(r"rsb-a[123]"), "rsb"),
    (re.compile(r"_cub"), "cub"),
    (re.compile(r"mill_in21k|in21k"), "mill-in21k"),
    (re.compile(r"cifar100"), "cifar100"),
    (re.compile(r"cifar10"), "cifar10"),
)


def guess_preset(family: str, file_name: str, *, backbone: str = "ResNet", wide: bool = False, num_classes: int) -> str:
    """The preset a file most likely needs: from mmpretrain's release names, then its architecture
    (mmpretrain evaluates V1c, V1d and the wide ResNets with Pillow's resize, the others with
    OpenCV's) and class count."""
    if family in ("onnx-zoo", "torchvision"):
        return family
    for pattern, preset in _BY_FILE_NAME:
        if pattern.search(file_name):
            return preset
    if backbone == "ResNet_CIFAR":
        return "cifar100" if num_classes == 100 else "cifar10"
    if num_classes == 200:
        return "cub"
    if wide or backbone in ("ResNetV1c", "ResNetV1d"):
        return "mmpretrain-pil"
    return "mmpretrain-in1k"
