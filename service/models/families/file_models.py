"""Models served from files given as NAME=PATH: each recognised in its own family's format.

- `.onnx`: a classifier graph (the ONNX model zoo's ResNet v1 and v2 files, or any graph with one
  image input and a linear head), run by ONNX Runtime with its pooled features as a second output;
  a zoo ResNet v2 also runs on torch (a GPU's CUDA graphs) with its weights imported from the file.
- `.pth`/`.pt`/`.safetensors` with mmcls/mmpretrain's `backbone.`/`head.` keys: their ResNet,
  ResNetV1c, ResNetV1d, ResNet_CIFAR and wide variants, recognised from keys and shapes.
- Any other state dict: torchvision's layout, matched against the catalog's architectures.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from service.config import RuntimeChoice, ServerPlan
from service.errors import StartupError
from service.imaging import Preprocessing
from service.models.building import make_runner, torch_runtime
from service.models.families.presets import Preset, guess_preset, preset_named
from service.models.families.torchvision_files import recognise_torchvision
from service.models.labels import find_labels
from service.models.loaded import LoadedModel, ModelCard
from service.models.onnx_loading import onnx_runtime
from service.models.runtimes import Runtime
from service.models.sources import FileModel
from service.models.weights import Origin, WeightsFile, instantiate, load_checkpoint, read_verified

logger = logging.getLogger(__name__)


def user_file(request: FileModel) -> WeightsFile:
    if not request.path.is_file():
        raise StartupError(f"{request.name}: {request.path} is not a file; check the path in --models")
    return WeightsFile(request.path, Origin.USER)


@dataclass(frozen=True)
class _Recognised:
    family: str
    architecture: str
    preset: Preset
    build: Callable[[], nn.Module] | None  # the torch module, where the family has one here


def load_file_model(
    request: FileModel,
    weights: WeightsFile,
    settings: ServerPlan,
    device: torch.device,
    *,
    expected_sha256: str | None = None,
) -> LoadedModel:
    if weights.path.suffix.lower() == ".onnx":  # onnx is imported only where a file needs it
        from service.models.families.onnx_files import load_onnx_file

        runtime, sha256, family, architecture, preset = load_onnx_file(
            request, weights, settings, device, expected_sha256
        )
        return assemble(request, weights, sha256, family, architecture, preset, runtime, settings, device)
    checkpoint = load_checkpoint(weights, expected_sha256=expected_sha256)
    recognised = _recognise_checkpoint(request, checkpoint.state_dict, weights)
    sha256 = checkpoint.sha256
    del checkpoint  # the builder holds the state dict until the runtime is made, then lets it go
    runtime = _runtime(request.name, sha256, recognised, settings, device)
    return assemble(
        request,
        weights,
        sha256,
        recognised.family,
        recognised.architecture,
        recognised.preset,
        runtime,
        settings,
        device,
    )


def assemble(
    request: FileModel,
    weights: WeightsFile,
    sha256: str,
    family: str,
    architecture: str,
    preset: Preset,
    runtime: Runtime,
    settings: ServerPlan,
    device: torch.device,
) -> LoadedModel:
    preprocessing = preset.preprocessing
    runner = make_runner(runtime, preprocessing, settings, device)
    labels = find_labels(request.name, weights.path, runner.num_classes, preset.labels.value, indices_allowed=True)
    logger.info(
        "%s: %s %s from %s, preset %s, on %s (%s)",
        request.name,
        family,
        architecture,
        weights.path,
        preset.name,
        runtime.info,
        device,
    )
    return LoadedModel(
        name=request.name,
        card=ModelCard(family, architecture, preset.name, labels.source, multi_label=preset.multi_label),
        runner=runner,
        labels=labels.names,
        preprocessing=preprocessing,
        weights=weights,
        sha256=sha256,
        num_parameters=runtime.num_parameters,
    )


def _recognise_checkpoint(request: FileModel, state_dict: dict[str, torch.Tensor], weights: WeightsFile) -> _Recognised:
    from service.models.families import mmpretrain

    path = weights.path
    if mmpretrain.looks_like_mmpretrain(state_dict):
        arch = mmpretrain.recognise(state_dict, path)
        preset_name = request.preset or guess_preset(
            "mmpretrain",
            path.name,
            backbone=arch.backbone,
            wide=arch.base_channels != 64,
            num_classes=arch.num_classes,
        )
        preset = preset_named(preset_name, request.name)
        return _Recognised("mmpretrain", arch.name, preset, lambda: mmpretrain.build(arch, state_dict, path))
    spec = recognise_torchvision(state_dict, path)
    preset = preset_named(request.preset or "torchvision", request.name)
    return _Recognised("torchvision", spec.arch, preset, lambda: instantiate(spec, state_dict, path))


def _runtime(name: str, sha256: str, recognised: _Recognised, settings: ServerPlan, device: torch.device) -> Runtime:
    assert recognised.build is not None
    preprocessing: Preprocessing = recognised.preset.preprocessing
    multi_label = recognised.preset.multi_label
    if settings.runtime is RuntimeChoice.ONNXRUNTIME:
        return onnx_runtime(name, sha256, recognised.build, settings, device, preprocessing, multi_label=multi_label)
    return torch_runtime(recognised.build(), preprocessing, settings, device, multi_label=multi_label)


def with_input_size(preset: Preset, size: int) -> Preset:
    """The preset resized in proportion for a graph whose input is `size` pixels square."""
    if preset.preprocessing.crop_size == size:
        return preset
    old = preset.preprocessing
    resized = dataclasses.replace(old, crop_size=size, resize_size=round(old.resize_size * size / old.crop_size))
    return dataclasses.replace(preset, preprocessing=resized)


__all__ = ["assemble", "load_file_model", "read_verified", "user_file", "with_input_size"]
