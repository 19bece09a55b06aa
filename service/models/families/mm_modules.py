"""mmpretrain's ResNet backbones as torchvision ResNets with a replaced stem or shortcut.

torchvision's ResNet already is mmpretrain's "pytorch"-style ResNet (the stride on the 3x3 conv of a
bottleneck; a wide ResNet is `width_per_group=128`). The variants differ only at the edges:

- ResNetV1c: a deep stem of three 3x3 conv-BN-ReLU units instead of the 7x7 conv;
- ResNetV1d: that stem, plus an average pool before the 1x1 conv of every strided shortcut;
- ResNet_CIFAR: a 3x3 stride-1 conv and no max-pool.

The modules keep mmpretrain's names below the top level (`stem` units are `conv`/`bn`/`activate`;
a V1d shortcut is `downsample.{0 pool, 1 conv, 2 bn}`), so a checkpoint maps onto them by renaming
the prefixes only (`to_torchvision_key`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from functools import lru_cache

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

BACKBONES = ("ResNet", "ResNetV1c", "ResNetV1d", "ResNet_CIFAR")
DEEP_STEM_BACKBONES = ("ResNetV1c", "ResNetV1d")
STAGE_BLOCKS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
STEM_CHANNELS = 64


def resnet_module(backbone: str, depth: int, num_classes: int, base_channels: int) -> ResNet:
    """The architecture, on the current default device, with torch's default initialisation."""
    block, layers = STAGE_BLOCKS[depth]
    model = ResNet(block, list(layers), num_classes=num_classes, width_per_group=base_channels)
    if backbone in DEEP_STEM_BACKBONES:
        model.conv1 = _deep_stem()
        # torchvision's stem applies bn1 and relu after conv1; the deep stem ends in its own BN-ReLU.
        model.bn1 = nn.Identity()
        model.relu = nn.Identity()
    if backbone == "ResNetV1d":
        for block_module in _blocks(model):
            if block_module.downsample is not None and block_module.stride != 1:
                block_module.downsample = _avg_down(block_module.downsample, block_module.stride)
    if backbone == "ResNet_CIFAR":
        model.conv1 = nn.Conv2d(3, STEM_CHANNELS, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


@lru_cache(maxsize=64)
def expected_shapes(backbone: str, depth: int, base_channels: int) -> dict[str, tuple[int, ...]]:
    """Every backbone entry of the checkpoint, in mmpretrain's naming, with its shape. Written out
    rather than read off a built model: recognition sizes up every variant when a file fits none,
    and building a ResNet-152, even on the meta device, takes about a second."""
    block, stage_blocks = STAGE_BLOCKS[depth]
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(conv: str, norm: str, c_out: int, c_in: int, kernel: int) -> None:
        shapes[f"backbone.{conv}.weight"] = (c_out, c_in, kernel, kernel)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"backbone.{norm}.{leaf}"] = (c_out,)
        shapes[f"backbone.{norm}.num_batches_tracked"] = ()

    if backbone in DEEP_STEM_BACKBONES:
        half = STEM_CHANNELS // 2
        for index, (c_in, c_out) in enumerate(((3, half), (half, half), (half, STEM_CHANNELS))):
            conv_bn(f"stem.{index}.conv", f"stem.{index}.bn", c_out, c_in, 3)
    else:
        conv_bn("conv1", "bn1", STEM_CHANNELS, 3, 3 if backbone == "ResNet_CIFAR" else 7)
    c_in = STEM_CHANNELS
    for stage, count in enumerate(stage_blocks):
        planes = 64 * 2**stage
        c_out = planes * block.expansion
        for index in range(count):
            prefix = f"layer{stage + 1}.{index}"
            if block is Bottleneck:
                width = planes * base_channels // 64
                conv_bn(f"{prefix}.conv1", f"{prefix}.bn1", width, c_in, 1)
                conv_bn(f"{prefix}.conv2", f"{prefix}.bn2", width, width, 3)
                conv_bn(f"{prefix}.conv3", f"{prefix}.bn3", c_out, width, 1)
            else:
                conv_bn(f"{prefix}.conv1", f"{prefix}.bn1", c_out, c_in, 3)
                conv_bn(f"{prefix}.conv2", f"{prefix}.bn2", c_out, c_out, 3)
            strided = index == 0 and stage > 0
            if strided or c_in != c_out:
                at = 1 if strided and backbone == "ResNetV1d" else 0  # an average pool comes first
                conv_bn(f"{prefix}.downsample.{at}", f"{prefix}.downsample.{at + 1}", c_out, c_in, 1)
            c_in = c_out
    return shapes


def to_torchvision_key(key: str) -> str:
    """`backbone.stem.0.conv.weight` -> `conv1.0.conv.weight`, `head.fc.bias` -> `fc.bias`, ..."""
    if key.startswith("head."):
        return key.removeprefix("head.")
    key = key.removeprefix("backbone.")
    if key.startswith("stem."):
        return "conv1." + key.removeprefix("stem.")
    return key


def _deep_stem() -> nn.Sequential:
    half = STEM_CHANNELS // 2
    widths = ((3, half, 2), (half, half, 1), (half, STEM_CHANNELS, 1))  # (in, out, stride)
    units = [
        nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
                bn=nn.BatchNorm2d(c_out),
                activate=nn.ReLU(inplace=True),
            )
        )
        for c_in, c_out, stride in widths
    ]
    return nn.Sequential(*units)


def _avg_down(downsample: nn.Module, stride: int) -> nn.Sequential:
    """A V1d shortcut: average-pool by the stride, then the 1x1 conv at stride 1, then BN."""
    assert isinstance(downsample, nn.Sequential)
    conv, norm = downsample[0], downsample[1]
    assert isinstance(conv, nn.Conv2d)
    pointwise = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=1, stride=1, bias=False)
    pool = nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True, count_include_pad=False)
    return nn.Sequential(pool, pointwise, norm)


def _blocks(model: ResNet) -> Iterator[BasicBlock | Bottleneck]:
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            assert isinstance(block, BasicBlock | Bottleneck)
            yield block
