"""ONNX files given as NAME=PATH: the model zoo's ResNet v1/v2 files, or any image classifier graph.

ONNX Runtime runs a copy of the file whose outputs are the logits and the pooled features (what
/embed returns), cached like an export. With the torch runtime (the default on a GPU), a zoo ResNet
v2 runs as a torch module with the file's weights, so that it gets CUDA graphs; a graph with no torch
architecture here (Gluon's ResNet v1 among them) stays on ONNX Runtime.
"""

from __future__ import annotations

import logging

import onnx
import torch

from service.config import RuntimeChoice, ServerPlan
from service.errors import StartupError
from service.models.building import torch_runtime
from service.models.families.onnx_graph import inspect_classifier, with_outputs
from service.models.families.onnx_import import import_resnet_v2, recognise_zoo
from service.models.families.presets import Preset, preset_named
from service.models.onnx_loading import onnx_runtime
from service.models.runtimes import Runtime
from service.models.sources import FileModel
from service.models.weights import WeightsFile, read_verified

logger = logging.getLogger(__name__)

FAMILY = "onnx-zoo"


def load_onnx_file(
    request: FileModel, weights: WeightsFile, settings: ServerPlan, device: torch.device, expected_sha256: str | None
) -> tuple[Runtime, str, str, str, Preset]:
    """(runtime, file sha256, family, architecture, preset) for the ONNX file `weights`."""
    from service.models.families.file_models import with_input_size

    data, sha256 = read_verified(weights, expected_sha256=expected_sha256)
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise StartupError(f"{request.name}: {weights.path} is not an ONNX model ({str(exc)[:120]})") from None
    del data
    graph = inspect_classifier(model, weights.path)
    try:
        zoo = recognise_zoo(model, weights.path)
        architecture = f"ResNet {zoo.version}-{zoo.depth}"
    except StartupError as exc:
        zoo, architecture = None, "ONNX classifier graph"
        logger.info("%s: not a zoo ResNet (%s); served as a generic classifier graph", request.name, exc)
    preset = with_input_size(preset_named(request.preset or FAMILY, request.name), graph.input_size)
    parameters = sum(_size(initializer) for initializer in model.graph.initializer)
    wants_torch = settings.runtime is not RuntimeChoice.ONNXRUNTIME
    if wants_torch and zoo is not None and zoo.version == "v2":
        module = import_resnet_v2(model, weights.path)
        runtime: Runtime = torch_runtime(module, preset.preprocessing, settings, device, multi_label=preset.multi_label)
        return runtime, sha256, FAMILY, architecture, preset
    if wants_torch:
        logger.warning("%s: %s has no torch architecture here; it runs on onnxruntime", request.name, architecture)

    def derive() -> tuple[bytes, int]:
        return with_outputs(model, graph), parameters

    runtime = onnx_runtime(
        request.name,
        sha256,
        None,
        settings,
        device,
        preset.preprocessing,
        given_file=(f"onnx {onnx.__version__} logits+features", derive),
        multi_label=preset.multi_label,
    )
    return runtime, sha256, FAMILY if zoo is not None else "onnx", architecture, preset


def _size(initializer: onnx.TensorProto) -> int:
    count = 1
    for dim in initializer.dims:
        count *= dim
    return count
