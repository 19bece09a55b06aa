"""A model on ONNX Runtime: its exported (or cached) file, optionally quantised, in a session.

The torch module is built only when no cached file matches the weights, and is dropped once exported:
the session holds the only resident copy of the weights.
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
) -> OnnxRuntime:
    """`name`'s session on `device`. Its file is exported from `build_module()`, or with
    `given_file` = (what made it, maker) derived from an ONNX file the user gave; either is called
    only when the cache holds no file for these weights."""
    ort = import_onnxruntime(name)
    cache = ExportCache(plan.onnx_cache_dir)
    key = ExportKey(name, weights_sha256, runtime=f"onnxruntime {ort.__version__}")

    def export() -> tuple[bytes, int]:
        assert build_module is not None
        module = build_module()
        logger.info("%s: exporting to ONNX (opset %d), once for these weights", name, key.opset)
        return export_onnx(module, input_size=preprocessing.crop_size, model=name), _parameters(module)

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


def _parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())
