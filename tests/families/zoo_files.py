"""Representative ONNX model-zoo ResNet files (github.com/onnx/models, validated/vision/classification/resnet).

No zoo file can be downloaded here, so the tests build files in the zoo's layout: input `data`
(N x 3 x 224 x 224 float, batch dynamic unless asked), 1000 logits out with no softmax unless asked,
BatchNormalization nodes kept apart from the convolutions (as MXNet's exporter writes them), and
initializers named as Gluon names its parameters (`resnetv24_stage1_conv0_weight`,
`resnetv24_batchnorm0_gamma`, `resnetv24_dense0_weight`).

v2 files come from the served `ResNetV2`; v1 files from `GluonResNetV1` below, Gluon's v1: the
bottleneck's stride on its FIRST 1x1 convolution (torchvision puts it on the 3x3), and biases on the
bottleneck's 1x1 body convolutions (Gluon's Conv2D default). Weights, BN statistics and a scaled
head are random but seeded: the same arguments give the same file.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
from onnx import helper
from torch import nn

from service.models.families.resnet_v2 import SPECS, build_resnet_v2

INPUT_NAME = "data"
PEAKED_LOGIT_STD = 5.0  # top softmax probability well above the rest for most inputs
INPUT_SIZE = 224
# Smaller than the input for speed (2 CPU cores): the pooled features' scale hardly depends on it.
SCALING_SIZE = 112
# The exporter traces one forward at this size; the graph has no size-dependent constant (global
# pooling), so the file then declares 224 x 224 and runs at any size.
TRACE_SIZE = 64


class BasicBlockV1(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = _shortcut(in_channels, channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        x = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(x + residual)


class BottleneckV1(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        width = channels // 4
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride, bias=True)  # Gluon: the stride is here
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, channels, 1, bias=True)
        self.bn3 = nn.BatchNorm2d(channels)
        self.downsample = _shortcut(in_channels, channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return torch.relu(self.bn3(self.conv3(x)) + residual)


def _shortcut(in_channels: int, channels: int, stride: int) -> nn.Sequential | None:
    if in_channels == channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))


class GluonResNetV1(nn.Module):
    """MXNet Gluon's ResNetV1 (gluon/model_zoo/vision/resnet.py) in torch, for building v1 files."""

    def __init__(self, depth: int, num_classes: int = 1000) -> None:
        super().__init__()
        bottleneck, blocks = SPECS[depth]
        widths = (256, 512, 1024, 2048) if bottleneck else (64, 128, 256, 512)
        block: type[BasicBlockV1 | BottleneckV1] = BottleneckV1 if bottleneck else BasicBlockV1
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_channels = 64
        stages = []
        for index, (count, channels) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if index == 0 else 2
            stage = [block(in_channels, channels, stride)] + [block(channels, channels, 1) for _ in range(count - 1)]
            stages.append(nn.Sequential(*stage))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(torch.mean(x, dim=(2, 3), keepdim=True), 1))


def build_module(version: str, depth: int, *, seed: int = 0, num_classes: int = 1000, peaked: bool = True) -> nn.Module:
    """The seeded torch module a zoo file is exported from (eval mode)."""
    if version not in ("v1", "v2"):
        raise ValueError(f"version must be v1 or v2, not {version!r}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = GluonResNetV1(depth, num_classes) if version == "v1" else build_resnet_v2(depth, num_classes)
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm2d):
                _randomise(layer)
        module.eval()
        if peaked:
            _scale_head(module, PEAKED_LOGIT_STD)
        else:  # a small random head: logits near zero, a flat softmax (and no forward to pay for)
            _small_head(module)
    return module


def _randomise(bn: nn.BatchNorm2d) -> None:
    assert bn.running_mean is not None and bn.running_var is not None
    channels = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels) * 0.1)
        bn.running_var.copy_(torch.rand(channels) * 1.5 + 0.5)
        if bn.affine:
            bn.weight.copy_(torch.rand(channels) * 0.5 + 0.5)
            bn.bias.copy_(torch.randn(channels) * 0.1)


def _small_head(module: nn.Module) -> None:
    fc = module.fc
    assert isinstance(fc, nn.Linear)
    with torch.no_grad():
        nn.init.normal_(fc.weight, std=0.01)
        nn.init.zeros_(fc.bias)


def _scale_head(module: nn.Module, logit_std: float) -> None:
    """Scale the dense layer so that a seeded normal batch's logits have standard deviation `logit_std`."""
    fc = module.fc
    assert isinstance(fc, nn.Linear)
    with torch.no_grad():
        nn.init.normal_(fc.weight, std=0.01)
        nn.init.normal_(fc.bias, std=0.01)
        logits = module(torch.randn(1, 3, SCALING_SIZE, SCALING_SIZE))
        factor = logit_std / float(logits.std())
        fc.weight.mul_(factor)
        fc.bias.mul_(factor)


def gluon_names(module: nn.Module, version: str) -> dict[str, str]:
    """state-dict key → Gluon parameter name: counters per kind within each scope (the network,
    each stage), in construction order, as Gluon's name scopes count them."""
    prefix = "resnetv17_" if version == "v1" else "resnetv24_"
    suffixes = {"weight": "gamma", "bias": "beta", "running_mean": "running_mean", "running_var": "running_var"}
    counters: dict[tuple[str, str], int] = {}
    names: dict[str, str] = {}
    for name, layer in module.named_modules():
        kind = {nn.Conv2d: "conv", nn.BatchNorm2d: "batchnorm", nn.Linear: "dense"}.get(type(layer))
        if kind is None:
            continue
        stage = re.match(r"layer(\d)\.", name)
        scope = f"{prefix}stage{stage.group(1)}_" if stage else prefix
        number = counters.get((scope, kind), 0)
        counters[scope, kind] = number + 1
        for key, _ in list(layer.named_parameters(recurse=False)) + list(layer.named_buffers(recurse=False)):
            if key == "num_batches_tracked":
                continue
            suffix = suffixes[key] if kind == "batchnorm" else key
            names[f"{name}.{key}"] = f"{scope}{kind}{number}_{suffix}"
    return names


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Small tensors on a shared 2-core box: one thread is as fast as two when idle, and much
    faster when other processes load the cores (two threads then wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_zoo_file(
    path: Path,
    version: str,
    depth: int,
    *,
    seed: int = 0,
    num_classes: int = 1000,
    peaked: bool = True,
    fixed_batch: int | None = None,
    softmax: bool = False,
) -> Path:
    with _one_thread():
        return _write(path, version, depth, seed, num_classes, peaked, fixed_batch, softmax)


def _write(
    path: Path,
    version: str,
    depth: int,
    seed: int,
    num_classes: int,
    peaked: bool,
    fixed_batch: int | None,
    softmax: bool,
) -> Path:
    module = build_module(version, depth, seed=seed, num_classes=num_classes, peaked=peaked)
    output = f"{'resnetv17' if version == 'v1' else 'resnetv24'}_dense0_fwd"
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (torch.zeros(fixed_batch or 1, 3, TRACE_SIZE, TRACE_SIZE),),
            buffer,  # type: ignore[arg-type]
            dynamo=False,
            opset_version=17,
            # PRESERVE on an eval module: inference BatchNormalization nodes, not folded into the
            # convolutions as EVAL's peephole pass does; the zoo's files keep them apart.
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=[INPUT_NAME],
            output_names=[output],
            dynamic_axes=None if fixed_batch else {INPUT_NAME: {0: "N"}, output: {0: "N"}},
        )
    model = onnx.load_from_string(buffer.getvalue())
    _declare_input_size(model, INPUT_SIZE)
    _rename_initializers(model, gluon_names(module, version))
    if softmax:
        append_softmax(model)
    path.write_bytes(model.SerializeToString())
    return path


def _declare_input_size(model: onnx.ModelProto, size: int) -> None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = size
    del model.graph.value_info[:]  # the traced intermediate sizes; no runtime needs them


def _rename_initializers(model: onnx.ModelProto, names: dict[str, str]) -> None:
    graph = model.graph
    renamed = {tensor.name: names[tensor.name] for tensor in graph.initializer if tensor.name in names}
    for tensor in graph.initializer:
        tensor.name = renamed.get(tensor.name, tensor.name)
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = renamed[name]
    for value in graph.input:
        value.name = renamed.get(value.name, value.name)


def append_softmax(model: onnx.ModelProto) -> None:
    graph = model.graph
    logits = graph.output[0]
    probabilities = helper.make_tensor_value_info("softmax_output", onnx.TensorProto.FLOAT, None)
    probabilities.type.CopyFrom(logits.type)
    graph.node.append(helper.make_node("Softmax", [logits.name], [probabilities.name], name="softmax0", axis=1))
    del graph.output[:]
    graph.output.append(probabilities)
