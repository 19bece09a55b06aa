"""The servable models: our names, their torchvision builders, and the official weights of each.

Everything about the official checkpoints (URL, file name, hash prefix, evaluation transform) is read
from torchvision's weights enums rather than copied here, so it cannot drift from torchvision.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from torch import nn
from torchvision.models import WeightsEnum, get_model_builder, get_model_weights

from service.imaging import Preprocessing

# The hash prefix torch.hub embeds in checkpoint names: `resnet50-11ad3fa6.pth` -> `11ad3fa6`.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.(pth|pt)$")


@dataclass(frozen=True)
class OfficialWeights:
    """One official torchvision checkpoint of an architecture."""

    tag: str  # e.g. IMAGENET1K_V2
    url: str
    preprocessing: Preprocessing
    is_default: bool

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha256_prefix(self) -> str:
        match = _HASH_IN_NAME.search(self.filename)
        assert match, self.filename
        return match.group(1)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # what clients put in the URL, e.g. resnet18v1
    arch: str  # the torchvision builder, e.g. resnet18
    aliases: tuple[str, ...] = ()

    @property
    def builder(self) -> Callable[..., nn.Module]:
        builder: Callable[..., nn.Module] = get_model_builder(self.arch)
        return builder

    @cached_property
    def official_weights(self) -> tuple[OfficialWeights, ...]:
        enum: type[WeightsEnum] = get_model_weights(self.arch)
        default = enum.DEFAULT
        return tuple(
            OfficialWeights(
                tag=member.name,
                url=member.url,
                preprocessing=preprocessing_of(member),
                is_default=member is default,
            )
            for member in enum
        )

    @property
    def default_weights(self) -> OfficialWeights:
        return next(w for w in self.official_weights if w.is_default)

    def official_by_filename(self, filename: str) -> OfficialWeights | None:
        return next((w for w in self.official_weights if w.filename == filename), None)


def preprocessing_of(weights: WeightsEnum) -> Preprocessing:
    """Read the evaluation transform off a torchvision weights entry."""
    transform: Any = weights.transforms()
    return Preprocessing(
        resize_size=int(transform.resize_size[0]),
        crop_size=int(transform.crop_size[0]),
        interpolation=transform.interpolation,
        antialias=bool(transform.antialias),
        mean=tuple(transform.mean),
        std=tuple(transform.std),
    )


def _zoo(depth: int) -> ModelSpec:
    return ModelSpec(name=f"resnet{depth}v1", arch=f"resnet{depth}", aliases=(f"resnet{depth}",))


CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        *(_zoo(depth) for depth in (18, 34, 50, 101, 152)),
        ModelSpec("wide_resnet50_2", "wide_resnet50_2"),
        ModelSpec("wide_resnet101_2", "wide_resnet101_2"),
        ModelSpec("resnext50_32x4d", "resnext50_32x4d"),
        ModelSpec("resnext101_32x8d", "resnext101_32x8d"),
        ModelSpec("resnext101_64x4d", "resnext101_64x4d"),
    )
}

_BY_ANY_NAME: dict[str, ModelSpec] = {name: spec for spec in CATALOG.values() for name in (spec.name, *spec.aliases)}


def find_spec(name: str) -> ModelSpec | None:
    """The catalog entry for a model name or alias (`resnet18` finds `resnet18v1`)."""
    return _BY_ANY_NAME.get(name)


def known_names() -> list[str]:
    return sorted(_BY_ANY_NAME)
