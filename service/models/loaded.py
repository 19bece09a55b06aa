"""A model ready to serve: its runtime on the device, its labels and transform, and what it is."""

from __future__ import annotations

from dataclasses import dataclass

from service.imaging import Preprocessing
from service.models.runner import ModelRunner
from service.models.weights import WeightsFile


@dataclass(frozen=True)
class ModelCard:
    """What /models and the model_info metric say a model is."""

    family: str  # "torchvision", "mmpretrain" or "onnx-zoo"
    architecture: str  # e.g. "resnet50", "ResNetV1d-50", "ResNet v2-50"
    preset: str  # the preprocessing preset (families/presets.py)
    label_source: str  # e.g. "ImageNet-1k synsets", "file cub.labels.txt"
    aliases: tuple[str, ...] = ()
    multi_label: bool = False


@dataclass(frozen=True)
class LoadedModel:
    name: str
    card: ModelCard
    runner: ModelRunner
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    weights: WeightsFile
    sha256: str
    num_parameters: int
