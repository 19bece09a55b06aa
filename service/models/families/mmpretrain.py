"""OpenMMLab (mmcls, now mmpretrain) ResNet checkpoints: recognised from their keys, run as torch code.

A checkpoint is `{"meta": ..., "state_dict": {"backbone.…", "head.fc.…"}}` for an `ImageClassifier`
made of a ResNet backbone, a GlobalAveragePooling neck and a LinearClsHead. `recognise` reads the
backbone variant, depth, width and class count from the keys and shapes alone; `build` returns a
torchvision ResNet with the variant's stem and shortcut (`mm_modules`), strictly loaded, whose `fc`
is the head: with `fc = nn.Identity()` it returns what mmpretrain's `extract_feat` does.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import itertools
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.errors import StartupError
from service.models.families.mm_modules import (
    BACKBONES,
    STAGE_BLOCKS,
    expected_shapes,
    resnet_module,
    to_torchvision_key,
)

_HEAD_WEIGHT = "head.fc.weight"
_HEAD_BIAS = "head.fc.bias"
# Old converted checkpoints (e.g. from torchvision's files) lack BN's step counter; eval never reads it.
_OPTIONAL_SUFFIX = ".num_batches_tracked"
_BLOCK_KEY = re.compile(r"^backbone\.layer([1-4])\.(\d+)\.")
_SHOWN = 3  # keys named per kind in an error line
_NUMPY_ALLOWANCE = threading.Lock()


@dataclass(frozen=True)
class MmResNetArch:
    backbone: str  # mmpretrain's type name: "ResNet", "ResNetV1c", "ResNetV1d" or "ResNet_CIFAR"
    depth: int  # 18, 34, 50, 101, 152
    num_classes: int
    # Middle channels of the first stage: 128 for the wide ResNets (mmpretrain's wide-resnet configs
    # say `base_channels=128, expansion=2`: 128 wide inside, 256 out, as torchvision's wide_resnet50_2).
    base_channels: int = 64

    @property
    def name(self) -> str:
        if self.base_channels == 64:
            return f"{self.backbone}-{self.depth}"
        return f"Wide{self.backbone}-{self.depth}-{self.base_channels // 64}"

    @property
    def feature_dim(self) -> int:
        block, _ = STAGE_BLOCKS[self.depth]
        return 512 * int(block.expansion)

    @property
    def input_size(self) -> int:
        return 32 if self.backbone == "ResNet_CIFAR" else 224


def looks_like_mmpretrain(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return _HEAD_WEIGHT in state_dict or any(key.startswith("backbone.") for key in state_dict)


def recognise(state_dict: Mapping[str, torch.Tensor], path: Path) -> MmResNetArch:
    """The architecture the checkpoint fits exactly (keys and shapes), or a StartupError naming the
    closest variant and the keys that keep it from fitting."""
    guess = _guess(state_dict)
    if guess is not None and not any(_mismatches(state_dict, guess)):
        return guess
    closest = min(_candidates(state_dict), key=lambda arch: sum(map(len, _mismatches(state_dict, arch))))
    raise StartupError(
        f"{path} is not an mmpretrain ResNet checkpoint: the closest is {closest.name} "
        f"({closest.num_classes} classes), and {_describe(state_dict, closest)}"
    )


def build(arch: MmResNetArch, state_dict: Mapping[str, torch.Tensor], path: Path) -> nn.Module:
    """The eval-mode module with every entry of `state_dict` loaded (half-precision ones as float32)."""
    if any(_mismatches(state_dict, arch)):
        raise StartupError(
            f"{path} does not fit {arch.name} ({arch.num_classes} classes): {_describe(state_dict, arch)}"
        )
    with torch.device("meta"):
        skeleton: nn.Module = resnet_module(arch.backbone, arch.depth, arch.num_classes, arch.base_channels)
    model = skeleton.to_empty(device="cpu")  # every tensor is overwritten below: skip the random init
    for name, buffer in model.named_buffers():
        if name.endswith(_OPTIONAL_SUFFIX):
            buffer.zero_()  # what a checkpoint without BN step counters leaves in place
    torch_state = {to_torchvision_key(key): _as_float32(value) for key, value in state_dict.items()}
    try:
        model.load_state_dict(torch_state, strict=True)
    except RuntimeError as exc:  # the checks above make this unreachable short of a torch change
        lines = str(exc).strip().splitlines()
        raise StartupError(f"{path} does not load into {arch.name}: {lines[-1].strip()[:300]}") from None
    model.eval()
    return model


def _guess(state_dict: Mapping[str, torch.Tensor]) -> MmResNetArch | None:
    """The variant the telltale keys point at; `recognise` then checks every key against it."""
    if "backbone.stem.0.conv.weight" in state_dict:
        avg_down = "backbone.layer2.0.downsample.2.weight" in state_dict  # a pool took index 0
        backbone = "ResNetV1d" if avg_down else "ResNetV1c"
    elif (conv1 := state_dict.get("backbone.conv1.weight")) is not None and conv1.ndim == 4:
        backbone = {7: "ResNet", 3: "ResNet_CIFAR"}.get(int(conv1.shape[-1]), "")
    else:
        return None
    first_conv = state_dict.get("backbone.layer1.0.conv1.weight")
    head = state_dict.get(_HEAD_WEIGHT)
    if not backbone or first_conv is None or head is None or head.ndim != 2:
        return None
    bottleneck = "backbone.layer1.0.conv3.weight" in state_dict
    blocks = _block_counts(state_dict)
    depth = next(
        (d for d, (kind, n) in STAGE_BLOCKS.items() if n == blocks and kind.expansion == (4 if bottleneck else 1)), 0
    )
    if not depth:
        return None
    return MmResNetArch(backbone, depth, int(head.shape[0]), base_channels=int(first_conv.shape[0]))


def _block_counts(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    highest = [-1, -1, -1, -1]
    for key in state_dict:
        if match := _BLOCK_KEY.match(key):
            stage, index = int(match.group(1)) - 1, int(match.group(2))
            highest[stage] = max(highest[stage], index)
    return tuple(count + 1 for count in highest)


def _candidates(state_dict: Mapping[str, torch.Tensor]) -> list[MmResNetArch]:
    head = state_dict.get(_HEAD_WEIGHT)
    num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 1000
    candidates = []
    for backbone, depth, base in itertools.product(BACKBONES, STAGE_BLOCKS, (64, 128)):
        if base == 64 or STAGE_BLOCKS[depth][0].expansion == 4:  # torchvision's basic block is 64 wide only
            candidates.append(MmResNetArch(backbone, depth, num_classes, base))
    return candidates


def _expected(arch: MmResNetArch) -> dict[str, tuple[int, ...]]:
    shapes = dict(expected_shapes(arch.backbone, arch.depth, arch.base_channels))
    shapes[_HEAD_WEIGHT] = (arch.num_classes, arch.feature_dim)
    shapes[_HEAD_BIAS] = (arch.num_classes,)
    return shapes


def _mismatches(state_dict: Mapping[str, torch.Tensor], arch: MmResNetArch) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, `key found vs expected` shape clashes), each in key order."""
    expected = _expected(arch)
    missing = [key for key in expected if key not in state_dict and not key.endswith(_OPTIONAL_SUFFIX)]
    unexpected = [key for key in state_dict if key not in expected]
    clashes = [
        f"{key} {tuple(value.shape)} vs {expected[key]}"
        for key, value in state_dict.items()
        if key in expected and tuple(value.shape) != expected[key]
    ]
    return missing, unexpected, clashes


def _describe(state_dict: Mapping[str, torch.Tensor], arch: MmResNetArch) -> str:
    parts = []
    for label, keys in zip(("missing", "unexpected", "wrong shape"), _mismatches(state_dict, arch), strict=True):
        if keys:
            more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
            parts.append(f"{label}: {', '.join(keys[:_SHOWN])}{more}")
    return "; ".join(parts)


def _as_float32(value: torch.Tensor) -> torch.Tensor:
    return value.float() if value.is_floating_point() else value


@functools.cache
def numpy_pickle_globals() -> list[Callable[..., object] | tuple[Callable[..., object], str]]:
    """What `torch.load(weights_only=True)` must allow for the numpy scalars, dtypes and arrays that
    mmengine leaves in a checkpoint's `meta`, and nothing else. A file keeps the module names of the
    numpy that wrote it, so numpy 1's and 2's names both map to the installed reconstructors. A dtype
    is rebuilt by calling `numpy.dtype`, then its per-type class takes the state: the classes of
    booleans, numbers and strings are allowed, never object or structured (void) ones."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ModuleNotFoundError:  # numpy 1
        multiarray = importlib.import_module("numpy.core.multiarray")
    allowed: list[Callable[..., object] | tuple[Callable[..., object], str]] = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    allowed += [type(np.dtype(code)) for code in "?bhilqBHILQefdgFDGUS"]
    return allowed


@contextlib.contextmanager
def numpy_pickle_allowed() -> Iterator[None]:
    """`torch.load(weights_only=True)` inside this block also accepts `numpy_pickle_globals()`.

    torch's `safe_globals` edits one process-wide set and removes its entries on exit, so two loads
    overlapping in threads would take the allowance from under each other: they take turns."""
    with _NUMPY_ALLOWANCE, torch.serialization.safe_globals(numpy_pickle_globals()):
        yield
