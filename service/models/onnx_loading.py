"""A model on ONNX Runtime: its exported (or cached) file, optionally quantised, in a session.

The torch module is built only when no cached file matches the weights: the session holds the only
resident copy of the weights. A catalog model is exported in a child process (child_process.py), so
the server never imports torchvision or the exporter, even on a first start with an empty cache,
which is every start of a pod whose cache is an emptyDir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable

import torch
from torch import nn

from service.config import Quantization, ServerPlan
from service.imaging import Preprocessing
from service.models.child_process import run_in_child
from service.models.onnx_export import ExportCache, ExportKey, export_onnx
from service.models.onnx_runtime import OnnxRuntime, import_onnxruntime

logger = logging.getLogger(__name__)


# Makes a model's fp32 ONNX file: its bytes and parameter count. Called only on a cache miss.
FileMaker = Callable[[], tuple[bytes, int]]


def onnx_runtime(
    name: str,
    weights_sha256: str,
    build_module: Callable[[], nn.Module] | None,
    plan: ServerPlan,
    device: torch.device,
    preprocessing: Preprocessing,
    *,
    given_file: tuple[str, FileMaker] | None = None,
    multi_label: bool = False,
    export_in_child: bool = False,
) -> OnnxRuntime:
    """`name`'s session on `device`. Its file is exported from `build_module()` (in a spawned child
    with `export_in_child`: `build_module` must then pickle), or with `given_file` = (what made it,
    maker) derived from an ONNX file the user gave; either is called only when the cache holds no
    file for these weights."""
    ort = import_onnxruntime(name)
    cache = ExportCache(plan.onnx_cache_dir)
    key = ExportKey(name, weights_sha256, runtime=f"onnxruntime {ort.__version__}")

    def export() -> tuple[bytes, int]:
        assert build_module is not None
        logger.info("%s: exporting to ONNX (opset %d), once for these weights", name, key.opset)
        if export_in_child:
            return run_in_child(_export, build_module, preprocessing.crop_size, name)
        return _export(build_module, preprocessing.crop_size, name)

    if given_file is not None:
        maker_name, maker = given_file
        key = dataclasses.replace(key, opset=0, exporter=maker_name)
        model = cache.get_or_create(key, maker)
    else:
        model = cache.get_or_create(key, export)
    quantization = "none"
    if plan.quantize is Quantization.INT8:
        from service.models.quantize import calibration_images, quantize_int8

        assert plan.calibration_images is not None  # Settings.resolve requires it with int8
        calibration = calibration_images(plan.calibration_images, preprocessing, max_pixels=plan.max_image_pixels)
        digest = hashlib.sha256(b"".join(image.tobytes() for image in calibration)).hexdigest()
        fp32 = model
        model = cache.get_or_create(
            key.derived(f"int8-{digest[:12]}"),
            lambda: (quantize_int8(fp32.path.read_bytes(), calibration), fp32.num_parameters),
        )
        del fp32
        quantization = f"int8, calibrated on {len(calibration)} images of {plan.calibration_images}"
    return OnnxRuntime(
        model.path,
        preprocessing,
        name=name,
        device=device,
        threads=plan.torch_threads,
        file_sha256=model.sha256,
        num_parameters=model.num_parameters,
        quantization=quantization,
        multi_label=multi_label,
    )


def _export(build_module: Callable[[], nn.Module], input_size: int, name: str) -> tuple[bytes, int]:
    module = build_module()
    parameters = sum(parameter.numel() for parameter in module.parameters())
    return export_onnx(module, input_size=input_size, model=name), parameters
