"""What an ONNX image classifier's graph holds: its image input, its logits, its pooled features.

A served model applies softmax itself, so a trailing Softmax is looked through: the logits are its
input. The features are the input of the head, the last Gemm (or MatMul, with or without an Add)
that computes the logits, i.e. the (N, D) tensor after the global pool and its Flatten/Reshape.
`with_outputs` rewrites a copy whose outputs are exactly [logits, features], for /embed.

Files from old exporters (the model zoo's opset-7 files) list every initializer among the graph's
inputs as well; only the inputs that no initializer fills are the model's inputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.errors import StartupError

# Nodes that pass a tensor through unchanged on the way to the logits.
_PASS_THROUGH = frozenset({"Identity"})


@dataclass(frozen=True)
class Head:
    """The classifier's dense layer as y = features @ weight.T + bias."""

    node: str  # the name (or first output) of the node that computes the logits
    weight: np.ndarray  # (num_classes, feature_dim)
    bias: np.ndarray  # (num_classes,)


@dataclass(frozen=True)
class ClassifierGraph:
    input_name: str
    input_size: int  # H = W
    fixed_batch: int | None  # None when the batch dimension is dynamic
    logits_name: str
    features_name: str
    num_classes: int
    feature_dim: int
    softmax_output: str | None  # the graph output that a trailing Softmax produced, if any
    head: Head


def read_model(path: Path) -> onnx.ModelProto:
    """The file as an ONNX model, or a one-line StartupError naming it."""
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError, OSError, onnx's own errors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StartupError(f"{path}: not a readable ONNX model ({reason})") from None
    if not model.graph.node or not model.graph.output:
        # Protobuf decodes many byte strings as an empty message rather than failing.
        raise StartupError(f"{path}: not an ONNX model (no graph nodes or outputs)")
    return model


def node_label(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


class Constants:
    """The graph's constant tensors: initializers and Constant nodes, looked up by name."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self._initializers = {tensor.name: tensor for tensor in graph.initializer}
        self._constant_nodes = {
            node.output[0]: node for node in graph.node if node.op_type == "Constant" and node.output
        }
        self._identities = {
            node.output[0]: node.input[0] for node in graph.node if node.op_type == "Identity" and node.input
        }

    def names(self) -> set[str]:
        return set(self._initializers)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """A constant's shape, read without converting its data."""
        name = self._source(name)
        if name in self._initializers:
            return tuple(self._initializers[name].dims)
        value = self.get(name)
        return None if value is None else value.shape

    def get(self, name: str) -> np.ndarray | None:
        name = self._source(name)
        if name in self._initializers:
            return numpy_helper.to_array(self._initializers[name])
        node = self._constant_nodes.get(name)
        if node is not None:
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(attribute.t)
        return None

    def _source(self, name: str) -> str:
        for _ in range(16):  # Identity chains are short; the bound only guards against a cycle
            if name not in self._identities:
                break
            name = self._identities[name]
        return name


def attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The node's attribute `name` as a Python value (ints, floats, lists, bytes), or `default`."""
    for item in node.attribute:
        if item.name == name:
            return helper.get_attribute_value(item)
    return default


def inspect_classifier(model: onnx.ModelProto, path: Path) -> ClassifierGraph:
    """The classifier's names and sizes; a one-line StartupError naming `path` where the input is
    not one float N x 3 x S x S image batch or no dense head computes the output."""
    graph = model.graph
    constants = Constants(graph)
    input_name, fixed_batch, input_size = _image_input(graph, constants.names(), path)
    producers = {output: node for node in graph.node for output in node.output}
    if not graph.output:
        raise StartupError(f"{path}: the graph has no outputs")
    logits_name = graph.output[0].name
    softmax_output = None
    producer = _skip_pass_through(producers.get(logits_name), producers)
    if producer is not None and producer.op_type in ("Softmax", "LogSoftmax"):
        softmax_output = logits_name
        logits_name = producer.input[0]
        producer = _skip_pass_through(producers.get(logits_name), producers)
    head, features_name = _head(producer, producers, constants, path)
    num_classes, feature_dim = head.weight.shape
    return ClassifierGraph(
        input_name=input_name,
        input_size=input_size,
        fixed_batch=fixed_batch,
        logits_name=logits_name,
        features_name=features_name,
        num_classes=int(num_classes),
        feature_dim=int(feature_dim),
        softmax_output=softmax_output,
        head=head,
    )


def _image_input(graph: onnx.GraphProto, initializers: set[str], path: Path) -> tuple[str, int | None, int]:
    inputs = [value for value in graph.input if value.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(value.name for value in inputs) or "none"
        raise StartupError(f"{path}: an image classifier takes one input, this file takes {len(inputs)} ({names})")
    value = inputs[0]
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or tensor.elem_type != TensorProto.FLOAT:
        kind = TensorProto.DataType.Name(tensor.elem_type) if value.type.HasField("tensor_type") else "not a tensor"
        raise StartupError(f"{path}: input {value.name!r} must be a float N x 3 x H x W image batch, it is {kind}")
    dims = [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor.shape.dim]
    shape = " x ".join("?" if dim is None else str(dim) for dim in dims)
    if len(dims) != 4 or dims[1] != 3:
        raise StartupError(f"{path}: input {value.name!r} must be a float N x 3 x H x W image batch, it is {shape}")
    height, width = dims[2], dims[3]
    if height is None or width is None or height != width:
        raise StartupError(f"{path}: input {value.name!r} must have a fixed, square height and width, it is {shape}")
    batch = dims[0] if dims[0] else None  # 0 is how some exporters write "unknown"
    return value.name, batch, height


def _skip_pass_through(node: onnx.NodeProto | None, producers: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producers.get(node.input[0])
    return node


def _head(
    node: onnx.NodeProto | None, producers: dict[str, onnx.NodeProto], constants: Constants, path: Path
) -> tuple[Head, str]:
    """The dense layer that computes the logits, and the name of its (N, D) input."""
    missing = StartupError(
        f"{path}: no classifier head found: the logits must come from a Gemm or MatMul(+Add) "
        f"with constant weights, they come from {node.op_type if node is not None else 'no node'}"
    )
    if node is None:
        raise missing
    if node.op_type == "Gemm":
        weight = constants.get(node.input[1])
        if weight is None or weight.ndim != 2 or attribute(node, "transA", 0):
            raise missing
        if not attribute(node, "transB", 0):
            weight = weight.T
        alpha = float(attribute(node, "alpha", 1.0))
        beta = float(attribute(node, "beta", 1.0))
        bias = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        bias = np.zeros(weight.shape[0], np.float32) if bias is None else beta * bias
        return _make_head(node, alpha * weight, bias, path), node.input[0]
    bias = None
    if node.op_type == "Add":
        matmuls = [producers.get(name) for name in node.input]
        index = next((i for i, item in enumerate(matmuls) if item is not None and item.op_type == "MatMul"), None)
        if index is None:
            raise missing
        bias = constants.get(node.input[1 - index])
        matmul = matmuls[index]
        if bias is None or matmul is None:
            raise missing
        node = matmul
    if node.op_type != "MatMul":
        raise missing
    weight = constants.get(node.input[1])
    if weight is None or weight.ndim != 2:
        raise missing
    bias = np.zeros(weight.shape[1], np.float32) if bias is None else bias
    return _make_head(node, weight.T, bias, path), node.input[0]


def _make_head(node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray, path: Path) -> Head:
    bias = np.asarray(bias, np.float32)
    if bias.size == 1:
        bias = np.full(weight.shape[0], bias.item(), np.float32)  # a broadcast scalar bias
    bias = bias.reshape(-1)
    if bias.shape != (weight.shape[0],):
        raise StartupError(
            f"{path}: classifier head {node_label(node)}: bias of {bias.shape[0]} for {weight.shape[0]} classes"
        )
    return Head(node_label(node), np.ascontiguousarray(weight, np.float32), bias)


def with_outputs(model: onnx.ModelProto, graph: ClassifierGraph) -> bytes:
    """A serialized copy of `model` whose outputs are exactly [logits, features], both (N, ·) float."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    batch = _batch_dimension(copy, graph.input_name)
    outputs = [
        _float_value(graph.logits_name, batch, graph.num_classes),
        _float_value(graph.features_name, batch, graph.feature_dim),
    ]
    names = {value.name for value in outputs}
    kept = [value for value in copy.graph.value_info if value.name not in names]
    del copy.graph.value_info[:]
    copy.graph.value_info.extend(kept)
    del copy.graph.output[:]
    copy.graph.output.extend(outputs)
    _drop_unused_nodes(copy.graph, names)
    data: bytes = copy.SerializeToString()
    return data


def _batch_dimension(model: onnx.ModelProto, input_name: str) -> str | int:
    for value in model.graph.input:
        if value.name == input_name:
            dim = value.type.tensor_type.shape.dim[0]
            if dim.HasField("dim_value") and dim.dim_value > 0:
                return int(dim.dim_value)
            return dim.dim_param or "batch"
    return "batch"


def _float_value(name: str, batch: str | int, width: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, width])


def _drop_unused_nodes(graph: onnx.GraphProto, outputs: Iterable[str]) -> None:
    """Remove the nodes no output needs any more (a trailing Softmax), keeping the others' order."""
    if any(
        item.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for item in n.attribute
    ):
        return  # subgraphs read outer names implicitly: leave such graphs whole
    needed = set(outputs)
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
    kept = list(reversed(keep))
    del graph.node[:]
    graph.node.extend(kept)
