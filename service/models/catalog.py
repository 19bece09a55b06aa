"""The servable models: our names, their torchvision builders, and the official weights of each.

The official checkpoints (file name, hash prefix, evaluation transform, which is the default) are a
copy of torchvision's weights enums, held to them by tests/unit/test_catalog.py, so they cannot drift
unnoticed. A copy, because importing torchvision costs about 165 MiB of RSS (its ops import
torch._dynamo) and a server that runs an exported ONNX file needs nothing else from it; the torch
builders import it when a module is built.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from torch import nn

from service.imaging import Preprocessing

# The hash prefix torch.hub embeds in checkpoint names: `resnet50-11ad3fa6.pth` -> `11ad3fa6`.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.(pth|pt)$")
OFFICIAL_BASE_URL = "https://download.pytorch.org/models/"


class _Official(NamedTuple):
    tag: str
    filename: str
    resize_size: int  # every one: bilinear, antialiased, crop 224, ImageNet's mean and std


# torchvision 0.29's weights enums: the default of each architecture is its last entry.
_OFFICIAL: dict[str, tuple[_Official, ...]] = {
    "resnet18": (_Official("IMAGENET1K_V1", "resnet18-f37072fd.pth", 256),),
    "resnet34": (_Official("IMAGENET1K_V1", "resnet34-b627a593.pth", 256),),
    "resnet50": (
        _Official("IMAGENET1K_V1", "resnet50-0676ba61.pth", 256),
        _Official("IMAGENET1K_V2", "resnet50-11ad3fa6.pth", 232),
    ),
    "resnet101": (
        _Official("IMAGENET1K_V1", "resnet101-63fe2227.pth", 256),
        _Official("IMAGENET1K_V2", "resnet101-cd907fc2.pth", 232),
    ),
    "resnet152": (
        _Official("IMAGENET1K_V1", "resnet152-394f9c45.pth", 256),
        _Official("IMAGENET1K_V2", "resnet152-f82ba261.pth", 232),
    ),
    "wide_resnet50_2": (
        _Official("IMAGENET1K_V1", "wide_resnet50_2-95faca4d.pth", 256),
        _Official("IMAGENET1K_V2", "wide_resnet50_2-9ba9bcbe.pth", 232),
    ),
    "wide_resnet101_2": (
        _Official("IMAGENET1K_V1", "wide_resnet101_2-32ee1156.pth", 256),
        _Official("IMAGENET1K_V2", "wide_resnet101_2-d733dc28.pth", 232),
    ),
    "resnext50_32x4d": (
        _Official("IMAGENET1K_V1", "resnext50_32x4d-7cdf4587.pth", 256),
        _Official("IMAGENET1K_V2", "resnext50_32x4d-1a0047aa.pth", 232),
    ),
    "resnext101_32x8d": (
        _Official("IMAGENET1K_V1", "resnext101_32x8d-8ba56ff5.pth", 256),
        _Official("IMAGENET1K_V2", "resnext101_32x8d-110c445d.pth", 232),
    ),
    "resnext101_64x4d": (_Official("IMAGENET1K_V1", "resnext101_64x4d-173b62eb.pth", 232),),
}


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
        from torchvision.models import get_model_builder

        builder: Callable[..., nn.Module] = get_model_builder(self.arch)
        return builder

    @cached_property
    def official_weights(self) -> tuple[OfficialWeights, ...]:
        entries = _OFFICIAL[self.arch]
        return tuple(
            OfficialWeights(
                tag=entry.tag,
                url=OFFICIAL_BASE_URL + entry.filename,
                preprocessing=Preprocessing(resize_size=entry.resize_size, crop_size=224),
                is_default=entry is entries[-1],
            )
            for entry in entries
        )

    @property
    def default_weights(self) -> OfficialWeights:
        return next(w for w in self.official_weights if w.is_default)

    def official_by_filename(self, filename: str) -> OfficialWeights | None:
        return next((w for w in self.official_weights if w.filename == filename), None)


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
