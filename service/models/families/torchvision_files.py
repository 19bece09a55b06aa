"""State dicts in torchvision's layout, given as files: which catalog architecture they fit.

Every catalog architecture is built on the meta device (no memory, no time) and its keys and shapes
held against the file's; the one that fits exactly wins. When none does, the error names the closest
and the first keys that differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from service.errors import StartupError
from service.models.catalog import CATALOG, ModelSpec


@dataclass(frozen=True)
class Fit:
    spec: ModelSpec
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    misshapen: tuple[str, ...]

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.misshapen)

    @property
    def distance(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.misshapen)


def fit(spec: ModelSpec, state_dict: Mapping[str, torch.Tensor]) -> Fit:
    fc = state_dict.get("fc.weight")
    classes = int(fc.shape[0]) if fc is not None and fc.ndim == 2 else 1000
    with torch.device("meta"):
        expected = {
            key: tuple(value.shape)
            for key, value in spec.builder(weights=None, num_classes=classes).state_dict().items()
        }
    given = {key: tuple(value.shape) for key, value in state_dict.items()}
    return Fit(
        spec,
        missing=tuple(key for key in expected if key not in given),
        unexpected=tuple(key for key in given if key not in expected),
        misshapen=tuple(key for key in expected if key in given and given[key] != expected[key]),
    )


def recognise_torchvision(state_dict: Mapping[str, torch.Tensor], path: Path) -> ModelSpec:
    fits: list[Fit] = []
    for spec in CATALOG.values():
        fits.append(fit(spec, state_dict))
        if fits[-1].exact:
            return spec
    closest = min(fits, key=lambda f: f.distance)
    raise StartupError(f"{path}: its keys fit no model family; the closest is {describe_misfit(closest)}")


def describe_misfit(closest: Fit) -> str:
    parts = [f"torchvision's {closest.spec.arch}"]
    for label, keys in (
        ("missing", closest.missing),
        ("unexpected", closest.unexpected),
        ("wrong shape", closest.misshapen),
    ):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            parts.append(f"{label}: {', '.join(keys[:3])}{more}")
    return "; ".join(parts)
