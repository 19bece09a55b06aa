"""A model on ONNX Runtime: its exported (or cached) file, optionally quantised, in a session.

The torch module is built only when no cached file matches the weights, and is dropped once exported:
the session holds the only resident copy of the weights.
"""

from __future__ import annotations

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


def onnx_runtime(
    name: str,
    weights_sha256: str,
    build_module: Callable[[], nn.Module],
    plan: ServerPlan,
    device: torch.device,
    preprocessing: Preprocessing,
) -> OnnxRuntime:
    """`name`'s session on `device`; `build_module` is called only to export a file not yet cached."""
    ort = import_onnxruntime(name)
    cache = ExportCache(plan.onnx_cache_dir)
    key = ExportKey(name, weights_sha256, runtime=f"onnxruntime {ort.__version__}")

    def export() -> tuple[bytes, int]:
        module = build_module()
        logger.info("%s: exporting to ONNX (opset %d), once for these weights", name, key.opset)
        return export_onnx(module, input_size=preprocessing.crop_size, model=name), _parameters(module)

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
    )


def _parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())
