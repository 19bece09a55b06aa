"""Class labels: the ImageNet-1k synsets for 1000-class models, a `.labels.txt` file otherwise."""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

from service.errors import StartupError

IMAGENET_CLASSES = 1000


@cache
def imagenet_labels() -> tuple[str, ...]:
    """`n02123045 tabby, tabby cat` lines, in torchvision's class index order."""
    text = resources.files("service").joinpath("data/imagenet_synsets.txt").read_text(encoding="utf-8")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    assert len(labels) == IMAGENET_CLASSES, len(labels)
    return labels


def labels_path(weights_path: Path, model_name: str) -> Path:
    return weights_path.parent / f"{model_name}.labels.txt"


def labels_for(model_name: str, weights_path: Path, num_classes: int) -> tuple[str, ...]:
    custom = labels_path(weights_path, model_name)
    if custom.is_file():
        labels = tuple(line.strip() for line in custom.read_text(encoding="utf-8").splitlines() if line.strip())
        if len(labels) != num_classes:
            raise StartupError(f"{custom} has {len(labels)} labels but {weights_path} has {num_classes} classes")
        return labels
    if num_classes == IMAGENET_CLASSES:
        return imagenet_labels()
    raise StartupError(
        f"{weights_path} has {num_classes} classes, not ImageNet's 1000: put one label a line in {custom}"
    )
