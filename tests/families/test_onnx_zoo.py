"""The ONNX model zoo's ResNet files: graph inspection, recognition, and the ResNet v2 torch import,
against onnxruntime run directly on representative files (tests/families/zoo_files.py), and
`ResNetV2` against timm's `resnetv2_50`."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from service.errors import StartupError
from service.models.families.onnx_graph import inspect_classifier, read_model, with_outputs
from service.models.families.onnx_import import ZooArch, import_resnet_v2, recognise_zoo, topological_order
from service.models.families.resnet_v2 import ResNetV2
from tests.families.zoo_files import append_softmax, build_module, write_zoo_file

pytestmark = pytest.mark.families

TOLERANCE = 1e-4  # the bound for the torch import against onnxruntime
FEATURES = {18: 512, 50: 2048}

ZooFile = Callable[..., Path]


@pytest.fixture(scope="module")
def zoo_file(tmp_path_factory: pytest.TempPathFactory) -> ZooFile:
    """Builds each distinct zoo file once for the module."""
    directory = tmp_path_factory.mktemp("zoo")
    built: dict[tuple[object, ...], Path] = {}

    def get(version: str, depth: int, **options: object) -> Path:
        key = (version, depth, *sorted(options.items()))
        if key not in built:
            name = "-".join(f"{item}" for item in key).replace("'", "").replace(" ", "")
            built[key] = write_zoo_file(directory / f"{name}.onnx", version, depth, **options)  # type: ignore[arg-type]
        return built[key]

    return get


@pytest.fixture(scope="module")
def imported(zoo_file: ZooFile) -> Callable[[int], ResNetV2]:
    """The v2 file of each depth imported once for the module; callers copy before changing it."""
    modules: dict[int, ResNetV2] = {}

    def get(depth: int) -> ResNetV2:
        if depth not in modules:
            path = zoo_file("v2", depth)
            modules[depth] = import_resnet_v2(read_model(path), path)
        return modules[depth]

    return get


def session(source: Path | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(source if isinstance(source, bytes) else str(source), options)


def images(count: int, seed: int = 0) -> np.ndarray:
    """Normalised image batches as the served transform makes them (mean 0, std 1 per channel)."""
    return np.random.default_rng(seed).standard_normal((count, 3, 224, 224)).astype(np.float32)


def run(source: Path | bytes, batch: np.ndarray) -> list[np.ndarray]:
    return session(source).run(None, {"data": batch})  # type: ignore[no-any-return]


@pytest.mark.parametrize(("version", "depth"), [("v1", 18), ("v2", 18), ("v1", 50), ("v2", 50)])
def test_inspect_and_with_outputs_on_zoo_files(
    zoo_file: ZooFile, imported: Callable[[int], ResNetV2], version: str, depth: int
) -> None:
    path = zoo_file(version, depth)
    model = read_model(path)
    graph = inspect_classifier(model, path)
    assert (graph.input_name, graph.input_size, graph.fixed_batch) == ("data", 224, None)
    assert graph.logits_name == model.graph.output[0].name
    assert graph.softmax_output is None
    assert (graph.num_classes, graph.feature_dim) == (1000, FEATURES[depth])
    assert recognise_zoo(model, path) == ZooArch(version, depth, 1000, 224)

    batch = images(2)
    (reference,) = run(path, batch)
    rewritten = session(with_outputs(model, graph))
    assert [value.name for value in rewritten.get_outputs()] == [graph.logits_name, graph.features_name]
    logits, features = rewritten.run(None, {"data": batch})
    assert np.array_equal(logits, reference)  # same graph, same kernels: bit for bit
    assert features.shape == (2, FEATURES[depth])
    assert np.abs(features).max() > 0.1  # features that carry a signal, not all zeros
    # The features are the head's input: the file's own dense layer maps them to its logits ...
    head = graph.head
    np.testing.assert_allclose(features @ head.weight.T + head.bias, reference, atol=1e-4, rtol=0)
    if version == "v2":
        # ... and for v2, the pooled features of the torch module imported from the file.
        module = copy.deepcopy(imported(depth))
        module.fc = nn.Identity()
        with torch.inference_mode():
            expected = module(torch.from_numpy(batch)).numpy()
        np.testing.assert_allclose(features, expected, atol=TOLERANCE, rtol=0)


def test_fixed_batch_and_trailing_softmax(zoo_file: ZooFile) -> None:
    path = zoo_file("v1", 18, fixed_batch=2, softmax=True)
    model = read_model(path)
    graph = inspect_classifier(model, path)
    assert graph.fixed_batch == 2
    assert graph.softmax_output == model.graph.output[0].name
    softmax = next(node for node in model.graph.node if node.op_type == "Softmax")
    assert graph.logits_name == softmax.input[0] != graph.softmax_output
    assert (graph.num_classes, graph.feature_dim) == (1000, 512)

    batch = images(2, seed=1)
    (probabilities,) = run(path, batch)
    logits, features = run(with_outputs(model, graph), batch)
    assert features.shape == (2, 512)
    assert not any(node.op_type == "Softmax" for node in onnx.load_from_string(with_outputs(model, graph)).graph.node)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), 1).numpy(), probabilities, atol=1e-6)
    # Same seed, same weights: the dynamic-batch file's logits.
    (dynamic,) = run(zoo_file("v1", 18), batch)
    np.testing.assert_allclose(logits, dynamic, atol=1e-5, rtol=0)
    assert probabilities.max(axis=1).min() > 0.1  # the scaled head makes the softmax peaked


def test_v2_with_a_softmax_appended(zoo_file: ZooFile, tmp_path: Path) -> None:
    model = read_model(zoo_file("v2", 18))
    append_softmax(model)
    path = tmp_path / "softmax.onnx"
    path.write_bytes(model.SerializeToString())
    graph = inspect_classifier(model, path)
    assert graph.logits_name == "resnetv24_dense0_fwd"
    batch = images(1, seed=2)
    logits, _ = run(with_outputs(model, graph), batch)
    (reference,) = run(zoo_file("v2", 18), batch)
    assert np.array_equal(logits, reference)


@pytest.mark.parametrize("depth", [18, 50])
def test_v2_import_agrees_with_onnxruntime(zoo_file: ZooFile, imported: Callable[[int], ResNetV2], depth: int) -> None:
    path = zoo_file("v2", depth)
    module = imported(depth)
    assert isinstance(module, ResNetV2)
    assert not module.training
    for count in (1, 3):
        batch = images(count, seed=count)
        (reference,) = run(path, batch)
        with torch.inference_mode():
            logits = module(torch.from_numpy(batch))
        np.testing.assert_allclose(logits.numpy(), reference, atol=TOLERANCE, rtol=0)
        probabilities = torch.softmax(logits, 1).numpy()
        expected = torch.softmax(torch.from_numpy(reference), 1).numpy()
        np.testing.assert_allclose(probabilities, expected, atol=TOLERANCE, rtol=0)
        assert (probabilities.argmax(1) == expected.argmax(1)).all()


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def test_import_uses_the_files_epsilon_and_momentum(zoo_file: ZooFile, tmp_path: Path) -> None:
    model = _copy(read_model(zoo_file("v2", 18)))
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            del node.attribute[:]
            node.attribute.extend([helper.make_attribute("epsilon", 0.25), helper.make_attribute("momentum", 0.8)])
    path = _save(model, tmp_path / "eps.onnx")
    module = import_resnet_v2(model, path)
    norms = [layer for layer in module.modules() if isinstance(layer, nn.BatchNorm2d)]
    assert {layer.eps for layer in norms} == {0.25}
    assert {round(layer.momentum or 0, 6) for layer in norms} == {0.2}
    batch = images(1, seed=3)
    with torch.inference_mode():
        logits = module(torch.from_numpy(batch)).numpy()
    (reference,) = run(path, batch)
    np.testing.assert_allclose(logits, reference, atol=TOLERANCE, rtol=0)


def test_import_matches_a_shortcut_listed_after_its_sibling(zoo_file: ZooFile, tmp_path: Path) -> None:
    """A block's shortcut and first convolution read the same tensor; a file may list either first."""
    model = _copy(read_model(zoo_file("v2", 18)))
    nodes = list(model.graph.node)
    convs = [index for index, node in enumerate(nodes) if node.op_type == "Conv"]
    swapped = 0
    for first, second in itertools.pairwise(convs):
        if nodes[first].input[0] == nodes[second].input[0]:
            nodes[first], nodes[second] = nodes[second], nodes[first]
            swapped += 1
    assert swapped == 3  # the shortcuts of stages 2-4
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    path = _save(model, tmp_path / "swapped.onnx")
    module = import_resnet_v2(model, path)
    batch = images(1, seed=4)
    with torch.inference_mode():
        logits = module(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(logits, run(path, batch)[0], atol=TOLERANCE, rtol=0)


def test_a_file_that_lists_its_initializers_as_inputs(zoo_file: ZooFile, tmp_path: Path) -> None:
    """The zoo's opset-7 files list every initializer among the graph's inputs, as IR version 3 required."""
    model = _copy(read_model(zoo_file("v2", 18)))
    model.graph.input.extend(
        helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        for tensor in model.graph.initializer
    )
    path = _save(model, tmp_path / "old-style.onnx")
    assert len(session(path).get_overridable_initializers()) > 50  # inputs with a default value
    graph = inspect_classifier(model, path)
    assert (graph.input_name, graph.num_classes) == ("data", 1000)
    assert recognise_zoo(model, path) == ZooArch("v2", 18, 1000, 224)
    batch = images(1, seed=7)
    with torch.inference_mode():
        logits = import_resnet_v2(model, path)(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(logits, run(path, batch)[0], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(("version", "depth"), [("v2", 101), ("v1", 152)])
def test_recognises_deep_zoo_files(zoo_file: ZooFile, version: str, depth: int) -> None:
    path = zoo_file(version, depth, peaked=False, num_classes=10)
    arch = recognise_zoo(read_model(path), path)
    assert (arch.version, arch.depth, arch.num_classes, arch.input_size) == (version, depth, 10, 224)


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")
def test_resnet_v2_exports_and_runs_in_onnxruntime(tmp_path: Path) -> None:
    module = build_module("v2", 18, seed=5).eval()
    path = tmp_path / "export.onnx"
    torch.onnx.export(
        module,
        (torch.zeros(1, 3, 224, 224),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["data"],
        output_names=["logits"],
        dynamic_axes={"data": {0: "batch"}, "logits": {0: "batch"}},
    )
    batch = images(2, seed=5)
    with torch.inference_mode():
        expected = module(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(run(path, batch)[0], expected, atol=TOLERANCE, rtol=0)


def test_resnet_v2_50_equals_timm_past_the_stem() -> None:
    """timm's `resnetv2_50` (plain convolutions, BatchNormAct2d) is the same pre-activation network
    as Gluon's ResNetV2-50 from the first block on: norm1 (BN+ReLU) feeds both the 1x1 shortcut and
    conv1, the stride sits on conv2 (3x3), the blocks add with no activation, and a final BN+ReLU
    precedes the pool and the dense layer (timm's head is a 1x1 conv: the same matrix). The stems
    differ: Gluon's is BatchNorm(scale=False, center=False) on the input, conv 7x7, BN, ReLU,
    max-pool; timm's pre-activation stem is conv 7x7 and max-pool only. So timm's stem is replaced
    by Gluon's and everything else is compared with weights mapped from ResNetV2."""
    timm = pytest.importorskip("timm")
    ours = build_module("v2", 50, seed=6, peaked=True)
    assert isinstance(ours, ResNetV2)
    reference = timm.create_model("resnetv2_50", pretrained=False, num_classes=1000).eval()
    assert [name for name, _ in reference.stem.named_children()] == ["conv", "pool"]  # the difference
    state = reference.state_dict()
    mapped = {}
    for key, value in ours.state_dict().items():
        target = _timm_key(key)
        if target is None:
            continue
        assert state[target].numel() == value.numel(), key
        mapped[target] = value.reshape(state[target].shape)
    assert set(state) - set(mapped) == {"stem.conv.weight"}  # every other timm tensor is mapped
    reference.load_state_dict({**mapped, "stem.conv.weight": ours.conv1.weight})
    reference.stem = nn.Sequential(ours.input_bn, ours.conv1, ours.bn1, nn.ReLU(), ours.maxpool)
    batch = torch.from_numpy(images(2, seed=6))
    with torch.inference_mode():
        expected = reference(batch)
        logits = ours(batch)
        features = reference.forward_head(reference.forward_features(batch), pre_logits=True)
        ours.fc = nn.Identity()
        ours_features = ours(batch)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_features, features, atol=1e-5, rtol=1e-5)


def _timm_key(key: str) -> str | None:
    """ResNetV2's state-dict key → timm resnetv2's; None for the stem that timm lacks."""
    parts = key.split(".")
    if parts[0].startswith("layer"):
        stage, block, rest = int(parts[0][5:]) - 1, parts[1], parts[2:]
        if rest[0] == "downsample":
            rest = ["downsample", "conv", *rest[1:]]
        elif rest[0].startswith("bn"):
            rest = [f"norm{rest[0][2:]}", *rest[1:]]
        return ".".join(["stages", str(stage), "blocks", block, *rest])
    if parts[0] == "final_bn":
        return ".".join(["norm", *parts[1:]])
    if parts[0] == "fc":
        return ".".join(["head", *parts])
    return None


# --- errors: each one line naming the file ---


def _tiny(path: Path, inputs: list[onnx.ValueInfoProto], nodes: list[onnx.NodeProto], output: str) -> Path:
    weight = numpy_helper.from_array(np.ones((10, 3), np.float32), "w")
    graph = helper.make_graph(
        nodes, "tiny", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], [weight]
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _image(
    name: str = "data", dtype: int = TensorProto.FLOAT, shape: list[object] | None = None
) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape or ["N", 3, 224, 224])


_HEAD = [
    helper.make_node("GlobalAveragePool", ["data"], ["pooled"]),
    helper.make_node("Flatten", ["pooled"], ["flat"]),
    helper.make_node("Gemm", ["flat", "w"], ["logits"], transB=1),
]


def test_a_tiny_classifier_is_inspected(tmp_path: Path) -> None:
    path = _tiny(tmp_path / "tiny.onnx", [_image(shape=[4, 3, 32, 32])], _HEAD, "logits")
    graph = inspect_classifier(read_model(path), path)
    assert (graph.fixed_batch, graph.input_size, graph.num_classes, graph.feature_dim) == (4, 32, 10, 3)
    assert (graph.logits_name, graph.features_name) == ("logits", "flat")


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([_image(), _image("mask")], "takes 2 (data, mask)"),
        ([_image(dtype=TensorProto.INT64)], "it is INT64"),
        ([_image(shape=["N", 224, 224])], "it is ? x 224 x 224"),
        ([_image(shape=["N", 1, 224, 224])], "it is ? x 1 x 224 x 224"),
        ([_image(shape=["N", 3, 224, 200])], "fixed, square height and width"),
        ([_image(shape=["N", 3, "H", "W"])], "fixed, square height and width"),
    ],
)
def test_an_input_that_is_not_an_image_batch(tmp_path: Path, inputs: list[onnx.ValueInfoProto], message: str) -> None:
    path = _tiny(tmp_path / "bad.onnx", inputs, _HEAD, "logits")
    with pytest.raises(StartupError) as error:
        inspect_classifier(read_model(path), path)
    assert _one_line_naming(error.value, path)
    assert message in str(error.value)


def test_no_classifier_head(tmp_path: Path) -> None:
    path = _tiny(tmp_path / "headless.onnx", [_image()], _HEAD[:2], "flat")
    with pytest.raises(StartupError, match="no classifier head found") as error:
        inspect_classifier(read_model(path), path)
    assert _one_line_naming(error.value, path)


@pytest.mark.parametrize("content", [None, b"", b"not an onnx file\n", bytes(range(256)) * 4])
def test_unreadable_or_not_onnx(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(StartupError, match="not (a readable ONNX model|an ONNX model)") as error:
        read_model(path)
    assert _one_line_naming(error.value, path)


def test_recognise_refuses_a_classifier_that_is_no_zoo_resnet(tmp_path: Path) -> None:
    nodes = [helper.make_node("Conv", ["data", "k"], ["c"]), helper.make_node("Add", ["c", "c"], ["s"])]
    nodes += [helper.make_node("Relu", ["s"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["pooled"])]
    nodes += _HEAD[1:]
    path = _tiny(tmp_path / "other.onnx", [_image()], nodes, "logits")
    model = read_model(path)
    model.graph.initializer.append(numpy_helper.from_array(np.ones((3, 3, 7, 7), np.float32), "k"))
    with pytest.raises(StartupError, match="not a model-zoo ResNet v1: its convolutions \\(1 7x7\\)") as error:
        recognise_zoo(model, path)
    assert _one_line_naming(error.value, path)


def test_import_refuses_a_v1_file(zoo_file: ZooFile) -> None:
    path = zoo_file("v1", 18)
    with pytest.raises(StartupError, match="a ResNet v1 file") as error:
        import_resnet_v2(read_model(path), path)
    assert _one_line_naming(error.value, path)


def _first(model: onnx.ModelProto, op_type: str, nth: int = 0) -> onnx.NodeProto:
    return [node for node in topological_order(model.graph) if node.op_type == op_type][nth]


def _replace_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name == name:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, name))
            return
    raise AssertionError(name)


def _break_variance(model: onnx.ModelProto) -> str:
    node = _first(model, "BatchNormalization", 3)
    _replace_initializer(model, node.input[4], np.ones(7, np.float32))
    return node.name


def _break_stride(model: onnx.ModelProto) -> str:
    node = _first(model, "Conv", 2)
    for item in node.attribute:
        if item.name == "strides":
            item.CopyFrom(helper.make_attribute("strides", [2, 2]))
    return node.name


def _scale_the_input_bn(model: onnx.ModelProto) -> str:
    node = _first(model, "BatchNormalization", 0)
    model.graph.initializer.append(numpy_helper.from_array(np.full(3, 2.0, np.float32), "input_scale"))
    node.input[1] = "input_scale"
    return node.name


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_break_variance, r"variance of shape \(7,\), expected \(64,\)"),
        (_break_stride, r"strides \[2, 2\], expected \[1, 1\]"),
        (_scale_the_input_bn, "the input BatchNorm has a scale or shift"),
    ],
)
def test_import_names_the_first_node_that_does_not_fit(
    zoo_file: ZooFile, tmp_path: Path, damage: Callable[[onnx.ModelProto], str], message: str
) -> None:
    model = _copy(read_model(zoo_file("v2", 18)))
    name = damage(model)
    path = _save(model, tmp_path / "damaged.onnx")
    with pytest.raises(StartupError, match=message) as error:
        import_resnet_v2(model, path)
    assert _one_line_naming(error.value, path)
    assert f"node {name} does not fit ResNet v2-18" in str(error.value)


def _one_line_naming(error: StartupError, path: Path) -> bool:
    text = str(error)
    return "\n" not in text and str(path) in text
