"""Class labels: a `.labels.txt` file beside the weights, or the label set the model came with
(ImageNet-1k synsets, CIFAR-10 or CIFAR-100 names), or, for a file served with no labels, the class
indices with a note saying so."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from service.errors import StartupError

logger = logging.getLogger(__name__)

IMAGENET_CLASSES = 1000

# Label sets shipped with the server: name → (file under service/data, what /models calls it).
_SHIPPED = {
    "imagenet": ("imagenet_synsets.txt", "ImageNet-1k synsets"),
    "cifar10": ("cifar10_labels.txt", "CIFAR-10 class names"),
    "cifar100": ("cifar100_labels.txt", "CIFAR-100 class names"),
}


@dataclass(frozen=True)
class Labels:
    names: tuple[str, ...]
    source: str  # where they came from, for /models


@cache
def shipped_labels(label_set: str) -> tuple[str, ...]:
    file_name, _ = _SHIPPED[label_set]
    text = resources.files("service").joinpath(f"data/{file_name}").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def imagenet_labels() -> tuple[str, ...]:
    """`n02123045 tabby, tabby cat` lines, in torchvision's class index order."""
    labels = shipped_labels("imagenet")
    assert len(labels) == IMAGENET_CLASSES, len(labels)
    return labels


def labels_path(weights_path: Path, model_name: str) -> Path:
    return weights_path.parent / f"{model_name}.labels.txt"


def labels_for(model_name: str, weights_path: Path, num_classes: int) -> tuple[str, ...]:
    """A catalog model's labels: a labels file, or ImageNet's for 1000 classes; else an error."""
    return find_labels(model_name, weights_path, num_classes, "imagenet", indices_allowed=False).names


def find_labels(
    model_name: str, weights_path: Path, num_classes: int, label_set: str, *, indices_allowed: bool
) -> Labels:
    """The first of: `<model>.labels.txt` or `<file stem>.labels.txt` beside the weights; the label
    set the model's family uses (or ImageNet's, for 1000 classes); class indices, where allowed."""
    for custom in dict.fromkeys((labels_path(weights_path, model_name), weights_path.with_suffix(".labels.txt"))):
        if custom.is_file():
            names = tuple(line.strip() for line in custom.read_text(encoding="utf-8").splitlines() if line.strip())
            if len(names) != num_classes:
                raise StartupError(
                    f"{model_name}: {custom} has {len(names)} labels but {weights_path} has {num_classes} classes"
                )
            return Labels(names, f"file {custom.name}")
    for candidate in (label_set, "imagenet"):
        if candidate in _SHIPPED and len(shipped_labels(candidate)) == num_classes:
            return Labels(shipped_labels(candidate), _SHIPPED[candidate][1])
    wanted = labels_path(weights_path, model_name)
    if not indices_allowed:
        raise StartupError(
            f"{weights_path} has {num_classes} classes, not ImageNet's 1000: put one label a line in {wanted}"
        )
    logger.warning(
        "%s: no labels for its %d classes; answering with class indices (put one label a line in %s)",
        model_name,
        num_classes,
        wanted,
    )
    return Labels(tuple(str(index) for index in range(num_classes)), f"none given: class indices 0-{num_classes - 1}")
