"""ResNet v2 (pre-activation, "Identity Mappings in Deep Residual Networks") as MXNet Gluon's model
zoo builds it, the network behind the ONNX model zoo's `resnet*-v2-7.onnx` files.

Where it differs from other pre-activation ResNets (timm's `resnetv2_*`, the paper's code):
- the network starts with a BatchNorm without scale or shift on the input image
  (Gluon's `BatchNorm(scale=False, center=False)`), before the 7x7 stem convolution;
- the stem is conv → BN → ReLU → max-pool (timm's pre-activation stem has no BN/ReLU);
- a block computes bn1 → ReLU first, and its shortcut convolution (when the shape changes) reads
  that pre-activated tensor; the bottleneck puts the stride on its 3x3 convolution;
- a final BN → ReLU precedes the global average pool and the dense layer.

Submodules are registered in Gluon's construction order (bn1, conv1, …, downsample), so that the
order of `named_modules()` follows Gluon's parameter names; the forward runs them in Gluon's
execution order (bn1, downsample, conv1, …). Batch-norm epsilon is Gluon's 1e-5.
"""

from __future__ import annotations

from typing import Final

import torch
from torch import nn

# depth → (bottleneck?, blocks per stage); channels per stage below, as Gluon's `resnet_spec`.
SPECS: Final[dict[int, tuple[bool, tuple[int, int, int, int]]]] = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}
STEM_CHANNELS: Final = 64
BASIC_CHANNELS: Final = (64, 128, 256, 512)
BOTTLENECK_CHANNELS: Final = (256, 512, 1024, 2048)
GLUON_BN_EPSILON: Final = 1e-5


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=GLUON_BN_EPSILON)


class BasicBlockV2(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = _bn(in_channels)
        self.conv1 = _conv(in_channels, channels, 3, stride)
        self.bn2 = _bn(channels)
        self.conv2 = _conv(channels, channels, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _conv(in_channels, channels, 1, stride) if in_channels != channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.relu(self.bn1(x))
        if self.downsample is not None:
            residual = self.downsample(x)
        x = self.conv1(x)
        x = self.conv2(self.relu(self.bn2(x)))
        return x + residual


class BottleneckV2(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        width = channels // 4
        self.bn1 = _bn(in_channels)
        self.conv1 = _conv(in_channels, width, 1)
        self.bn2 = _bn(width)
        self.conv2 = _conv(width, width, 3, stride)
        self.bn3 = _bn(width)
        self.conv3 = _conv(width, channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _conv(in_channels, channels, 1, stride) if in_channels != channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.relu(self.bn1(x))
        if self.downsample is not None:
            residual = self.downsample(x)
        x = self.conv1(x)
        x = self.conv2(self.relu(self.bn2(x)))
        x = self.conv3(self.relu(self.bn3(x)))
        return x + residual


class ResNetV2(nn.Module):
    """Gluon's ResNetV2: normalised float (N, 3, H, W) in, logits out; `fc = nn.Identity()` gives
    the pooled features (512 for depth 18/34, 2048 from 50 up)."""

    def __init__(self, depth: int, num_classes: int = 1000) -> None:
        super().__init__()
        if depth not in SPECS:
            raise ValueError(f"ResNet v2 depth {depth} is not one of {sorted(SPECS)}")
        bottleneck, blocks = SPECS[depth]
        block: type[BasicBlockV2 | BottleneckV2] = BottleneckV2 if bottleneck else BasicBlockV2
        widths = BOTTLENECK_CHANNELS if bottleneck else BASIC_CHANNELS
        self.depth = depth
        self.input_bn = nn.BatchNorm2d(3, eps=GLUON_BN_EPSILON, affine=False)
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 7, stride=2, padding=3, bias=False)
        self.bn1 = _bn(STEM_CHANNELS)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = STEM_CHANNELS
        stages: list[nn.Sequential] = []
        for index, (count, channels) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if index == 0 else 2
            stage = [block(in_channels, channels, stride)]
            stage += [block(channels, channels, 1) for _ in range(count - 1)]
            stages.append(nn.Sequential(*stage))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.final_bn = _bn(in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_channels
        self.fc: nn.Module = nn.Linear(in_channels, num_classes)
        self._initialise()

    def _initialise(self) -> None:
        # Gluon's model zoo trains from Xavier/MSRA-like scales; He init keeps a random model's
        # activations in range through 50 pre-activation blocks, which the tests rely on.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.input_bn(x))
        x = self.maxpool(self.relu(self.bn1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.relu(self.final_bn(x))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.fc(self.forward_features(x))
        return output


def build_resnet_v2(depth: int, num_classes: int = 1000) -> ResNetV2:
    return ResNetV2(depth, num_classes)
