"""The ONNX model zoo's ResNet files: which one a file is, and its v2 weights in a torch module.

The zoo's files come from MXNet Gluon's model zoo (ResNet v1 and v2 at 18 to 152 layers). The
architecture is read from the graph, never from names: v2 starts with a BatchNormalization on the
input and its residual sums feed the next block's BatchNormalization (pre-activation), where v1
starts with the stem Conv and passes every sum through a Relu. The depth follows from the
convolutions: basic blocks hold two 3x3 convolutions and no 1x1 but the three shortcuts, bottleneck
blocks one 3x3 and two 1x1 besides the four shortcuts; depth = 2 + the layers of the blocks.

Weights are imported by walking the file's Conv and BatchNormalization nodes in execution order
(the graph's topological order) beside the torch module's convolutions and batch norms in its own
execution order (recorded with forward hooks), checking every shape and convolution attribute on
the way, then the dense head. Two sibling nodes that read the same tensor (a block's shortcut and
first convolution) may come in either order in a file; they are matched by shape.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from service.errors import StartupError
from service.models.families.onnx_graph import Constants, attribute, inspect_classifier, node_label
from service.models.families.resnet_v2 import SPECS, ResNetV2, build_resnet_v2

ONNX_BN_EPSILON = 1e-5  # BatchNormalization's defaults when a node omits them
ONNX_BN_MOMENTUM = 0.9
_SHORTCUTS = {False: 3, True: 4}  # shortcut convolutions of basic / bottleneck networks


@dataclass(frozen=True)
class ZooArch:
    version: str  # "v1" or "v2"
    depth: int
    num_classes: int
    input_size: int


def topological_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes in an execution order; among nodes ready together, the file's order decides."""
    producers = {output: index for index, node in enumerate(graph.node) for output in node.output}
    waiting = [0] * len(graph.node)
    consumers: list[list[int]] = [[] for _ in graph.node]
    for index, node in enumerate(graph.node):
        for name in set(node.input):
            if name in producers:
                waiting[index] += 1
                consumers[producers[name]].append(index)
    ready = deque(index for index, count in enumerate(waiting) if count == 0)
    order: list[int] = []
    while ready:
        index = ready.popleft()
        order.append(index)
        for consumer in sorted(consumers[index]):
            waiting[consumer] -= 1
            if waiting[consumer] == 0:
                ready.append(consumer)
    return [graph.node[index] for index in order]


def recognise_zoo(model: onnx.ModelProto, path: Path) -> ZooArch:
    """Which zoo ResNet the graph is (version, depth, classes, input size), from its structure."""
    classifier = inspect_classifier(model, path)
    graph = model.graph
    nodes = topological_order(graph)
    constants = Constants(graph)
    version = _version(nodes, classifier.input_name, constants, path)
    kernels: dict[int, int] = {}
    for node in nodes:
        if node.op_type == "Conv":
            shape = constants.shape(node.input[1]) or tuple(attribute(node, "kernel_shape", ()))
            size = int(shape[-1]) if len(shape) >= 2 else 0
            kernels[size] = kernels.get(size, 0) + 1
    depth = _depth(kernels)
    if depth is None:
        counts = ", ".join(f"{count} {size}x{size}" for size, count in sorted(kernels.items())) or "none"
        raise StartupError(
            f"{path}: not a model-zoo ResNet {version}: its convolutions ({counts}) match no depth of "
            f"{', '.join(map(str, sorted(SPECS)))}"
        )
    return ZooArch(version, depth, classifier.num_classes, classifier.input_size)


def _version(nodes: list[onnx.NodeProto], input_name: str, constants: Constants, path: Path) -> str:
    first = [node.op_type for node in nodes if input_name in node.input]
    consumers: dict[str, list[str]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    sums = [
        node
        for node in nodes
        if node.op_type == "Add" and len(node.input) == 2 and all(constants.get(name) is None for name in node.input)
    ]
    followers = {op for node in sums for op in consumers.get(node.output[0], [])}
    if first == ["BatchNormalization"] and sums and "Relu" not in followers:
        return "v2"
    if first == ["Conv"] and sums and followers == {"Relu"}:
        return "v1"
    raise StartupError(
        f"{path}: not a model-zoo ResNet: the input feeds {', '.join(first) or 'nothing'} and the "
        f"{len(sums)} residual sums feed {', '.join(sorted(followers)) or 'nothing'}; v1 starts with a Conv "
        "and passes sums through Relu, v2 starts with a BatchNormalization and feeds sums to the next one"
    )


def _depth(kernels: dict[int, int]) -> int | None:
    if set(kernels) - {1, 3, 7} or kernels.get(7) != 1:
        return None
    threes, ones = kernels.get(3, 0), kernels.get(1, 0)
    for depth, (bottleneck, blocks) in SPECS.items():
        count = sum(blocks)
        if bottleneck and (threes, ones) == (count, 2 * count + _SHORTCUTS[True]):
            return depth
        if not bottleneck and (threes, ones) == (2 * count, _SHORTCUTS[False]):
            return depth
    return None


def import_resnet_v2(model: onnx.ModelProto, path: Path) -> ResNetV2:
    """A ResNetV2 in eval mode holding the file's weights; a one-line StartupError where they do not fit."""
    arch = recognise_zoo(model, path)
    if arch.version != "v2":
        raise StartupError(f"{path}: a ResNet {arch.version} file; only ResNet v2 files import into torch")
    module = build_resnet_v2(arch.depth, arch.num_classes).eval()
    constants = Constants(model.graph)
    nodes = [node for node in topological_order(model.graph) if node.op_type in ("Conv", "BatchNormalization")]
    modules = _execution_order(module)
    for index in range(max(len(nodes), len(modules))):
        if index >= len(nodes):
            raise StartupError(
                f"{path}: the file ends before ResNet v2-{arch.depth}'s {type(modules[index]).__name__} #{index}"
            )
        if index >= len(modules):
            raise StartupError(f"{path}: node {node_label(nodes[index])} has no place in ResNet v2-{arch.depth}")
        problem = _fit(nodes[index], modules[index], constants)
        if problem is not None and _is_swappable(nodes, modules, index, constants):
            nodes[index], nodes[index + 1] = nodes[index + 1], nodes[index]
            problem = None
        if problem is not None:
            raise StartupError(
                f"{path}: node {node_label(nodes[index])} does not fit ResNet v2-{arch.depth}: {problem}"
            )
        _load(nodes[index], modules[index], constants)
    head = inspect_classifier(model, path).head
    fc = module.fc
    assert isinstance(fc, nn.Linear)
    if tuple(fc.weight.shape) != head.weight.shape:
        raise StartupError(
            f"{path}: node {head.node} does not fit ResNet v2-{arch.depth}: weight {head.weight.shape}, "
            f"expected {tuple(fc.weight.shape)}"
        )
    with torch.no_grad():
        fc.weight.copy_(_tensor(head.weight))
        fc.bias.copy_(_tensor(head.bias))
    return module


def _execution_order(module: ResNetV2) -> list[nn.Module]:
    """`module`'s convolutions and batch norms in the order its forward calls them."""
    order: list[nn.Module] = []

    def record(layer: nn.Module, *_: object) -> None:
        order.append(layer)

    hooks = [
        layer.register_forward_hook(record)
        for layer in module.modules()
        if isinstance(layer, nn.Conv2d | nn.BatchNorm2d)
    ]
    try:
        with torch.inference_mode():
            module(torch.zeros(1, 3, 32, 32))  # small: only the order of the calls matters
    finally:
        for hook in hooks:
            hook.remove()
    return order


def _is_swappable(nodes: list[onnx.NodeProto], modules: list[nn.Module], index: int, constants: Constants) -> bool:
    if index + 1 >= min(len(nodes), len(modules)) or nodes[index].input[0] != nodes[index + 1].input[0]:
        return False
    return (
        _fit(nodes[index + 1], modules[index], constants) is None
        and _fit(nodes[index], modules[index + 1], constants) is None
    )


def _fit(node: onnx.NodeProto, module: nn.Module, constants: Constants) -> str | None:
    """Why `node` cannot hold `module`'s weights, or None when it can."""
    if isinstance(module, nn.Conv2d):
        return _conv_fit(node, module, constants)
    assert isinstance(module, nn.BatchNorm2d)
    if node.op_type != "BatchNormalization":
        return f"a {node.op_type} where a BatchNormalization of {module.num_features} channels belongs"
    values = _bn_values(node, constants)
    wanted = (module.num_features,)
    for label, value in zip(("scale", "bias", "mean", "variance"), values, strict=True):
        optional = label in ("scale", "bias") and not module.affine
        if value is None and not optional:
            return f"its {label} is not a constant"
        if value is not None and value.reshape(-1).shape != wanted:
            return f"{label} of shape {value.shape}, expected {wanted}"
    if not module.affine:
        # Gluon's input BatchNorm(scale=False, center=False): the file may hold ones and zeros.
        scale, bias = values[0], values[1]
        if (scale is not None and not np.all(scale == 1)) or (bias is not None and not np.all(bias == 0)):
            return "the input BatchNorm has a scale or shift, Gluon's has neither"
    return None


def _conv_fit(node: onnx.NodeProto, module: nn.Conv2d, constants: Constants) -> str | None:
    wanted = tuple(module.weight.shape)
    if node.op_type != "Conv":
        return f"a {node.op_type} where a Conv with weight {wanted} belongs"
    shape = constants.shape(node.input[1])
    if shape is None:
        return "its weight is not a constant"
    if shape != wanted:
        return f"weight {shape}, expected {wanted}"
    bias = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if bias is not None and np.any(bias != 0):
        return "a bias, where Gluon's ResNet v2 convolutions have none"
    padding = module.padding
    assert isinstance(padding, tuple)
    expected = {
        "strides": list(module.stride),
        "pads": [*padding, *padding],
        "dilations": list(module.dilation),
        "group": module.groups,
        "auto_pad": b"NOTSET",
    }
    defaults: dict[str, object] = {
        "strides": [1, 1],
        "pads": [0, 0, 0, 0],
        "dilations": [1, 1],
        "group": 1,
        "auto_pad": b"NOTSET",
    }
    for name, value in expected.items():
        found = attribute(node, name, defaults[name])
        found = list(found) if isinstance(found, list | tuple) else found
        if found != value:
            return f"{name} {found}, expected {value}"
    return None


def _load(node: onnx.NodeProto, module: nn.Module, constants: Constants) -> None:
    with torch.no_grad():
        if isinstance(module, nn.Conv2d):
            module.weight.copy_(_tensor(constants.get(node.input[1])))
            return
        assert isinstance(module, nn.BatchNorm2d)
        scale, bias, mean, variance = _bn_values(node, constants)
        if module.affine:
            module.weight.copy_(_tensor(scale).reshape(-1))
            module.bias.copy_(_tensor(bias).reshape(-1))
        assert module.running_mean is not None
        assert module.running_var is not None
        module.running_mean.copy_(_tensor(mean).reshape(-1))
        module.running_var.copy_(_tensor(variance).reshape(-1))
        module.eps = float(attribute(node, "epsilon", ONNX_BN_EPSILON))
        # ONNX's momentum weighs the running value, torch's the new batch: Gluon's 0.9 is torch's 0.1.
        module.momentum = 1.0 - float(attribute(node, "momentum", ONNX_BN_MOMENTUM))


def _bn_values(node: onnx.NodeProto, constants: Constants) -> list[np.ndarray | None]:
    """A BatchNormalization's scale, bias, mean and variance; None for one absent or not constant."""
    names = [*node.input[1:5], "", "", "", ""][:4]
    return [constants.get(name) if name else None for name in names]


def _tensor(value: np.ndarray | None) -> torch.Tensor:
    assert value is not None  # _fit checked it
    return torch.from_numpy(np.array(value, np.float32))  # a writable copy: torch warns on read-only arrays
