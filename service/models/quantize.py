"""Static int8 quantisation of an exported ONNX classifier, calibrated on photos.

ONNX Runtime's quantiser works on files, so the model goes through a private temporary directory
that is removed afterwards. The recipe (`DEFAULT_RECIPE`: QDQ, per-channel int8 weights, uint8
activations, MinMax ranges, the classifier kept in float32) is the one that measured fastest on the
CPU provider (2 threads, AVX2 without VNNI) among those that kept the best top-1 agreement with
fp32; `python -m benchmarks.quantize_agreement --sweep` measures the alternatives.
"""

from __future__ import annotations

import logging
import pathlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from service.errors import ServeError, StartupError
from service.imaging import Preprocessing, preprocess

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
# The server's default pixel cap (settings' max_image_pixels): calibration photos pass the same checks.
DEFAULT_MAX_PIXELS = 50_000_000

CalibrationMethodName = Literal["minmax", "entropy", "percentile"]


@dataclass(frozen=True)
class QuantRecipe:
    """The knobs of ONNX Runtime's static quantiser that change accuracy or speed.

    `qdq`: QuantizeLinear/DequantizeLinear pairs around float ops (ORT fuses them into int8 kernels)
    rather than QLinear* operators; `activations_signed`, `weights_signed`: int8 rather than uint8;
    `reduce_range`: 7-bit weights, which avoid the int16 saturation of AVX2's u8 x s8 dot product on
    CPUs without VNNI.
    """

    qdq: bool = True
    per_channel: bool = True
    reduce_range: bool = False
    activations_signed: bool = False
    weights_signed: bool = True
    method: CalibrationMethodName = "minmax"
    preprocess: bool = True
    quantize_head: bool = False  # the classifier (Gemm/MatMul) too, or kept in float32

    @property
    def label(self) -> str:
        parts = [
            "QDQ" if self.qdq else "QOperator",
            "per-channel" if self.per_channel else "per-tensor",
            ("S8" if self.activations_signed else "U8") + ("S8" if self.weights_signed else "U8"),
            self.method,
        ]
        if self.reduce_range:
            parts.append("reduce-range")
        if not self.preprocess:
            parts.append("no-preprocess")
        parts.append("int8-head" if self.quantize_head else "fp32-head")
        return " ".join(parts)


DEFAULT_RECIPE = QuantRecipe()


class _ArrayReader:
    """ONNX Runtime's CalibrationDataReader (matched by its `get_next`) over in-memory arrays."""

    def __init__(self, input_name: str, arrays: Sequence[np.ndarray]) -> None:
        self._input_name = input_name
        self._arrays = arrays
        self._iterator: Iterator[np.ndarray] = iter(arrays)

    def get_next(self) -> dict[str, np.ndarray] | None:
        array = next(self._iterator, None)
        return None if array is None else {self._input_name: array}

    def rewind(self) -> None:
        self._iterator = iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)


def quantize_int8(
    model: bytes,
    calibration: Sequence[np.ndarray],
    *,
    recipe: QuantRecipe = DEFAULT_RECIPE,
) -> bytes:
    """An int8 copy of the fp32 ONNX `model`, its activation ranges calibrated on `calibration`:
    float32 arrays of shape (1, 3, H, W), normalised as the model expects. Deterministic: the same
    model and calibration give the same bytes."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ValueError("int8 quantisation needs at least one calibration image")
    for array in calibration:
        if array.dtype != np.float32 or array.ndim != 4 or array.shape[0] != 1:
            raise ValueError(f"calibration arrays must be float32 (1, C, H, W), got {array.dtype} {array.shape}")
    input_name = onnx.load_model_from_string(model).graph.input[0].name
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    with tempfile.TemporaryDirectory(prefix="resnet-serve-quantize-") as scratch:
        source = pathlib.Path(scratch) / "fp32.onnx"
        source.write_bytes(model)
        if recipe.preprocess:
            prepared = pathlib.Path(scratch) / "prepared.onnx"
            quant_pre_process(str(source), str(prepared))
            source = prepared
        target = pathlib.Path(scratch) / "int8.onnx"
        prepared_nodes = onnx.load_model(str(source), load_external_data=False).graph.node
        head = [node.name for node in prepared_nodes if node.op_type in ("Gemm", "MatMul")]
        quantize_static(
            str(source),
            str(target),
            _ArrayReader(input_name, calibration),
            quant_format=QuantFormat.QDQ if recipe.qdq else QuantFormat.QOperator,
            per_channel=recipe.per_channel,
            reduce_range=recipe.reduce_range,
            activation_type=QuantType.QInt8 if recipe.activations_signed else QuantType.QUInt8,
            weight_type=QuantType.QInt8 if recipe.weights_signed else QuantType.QUInt8,
            calibrate_method=methods[recipe.method],
            nodes_to_exclude=None if recipe.quantize_head else head,
        )
        return target.read_bytes()


def calibration_images(
    directory: pathlib.Path,
    preprocessing: Preprocessing,
    *,
    limit: int = 64,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[np.ndarray]:
    """Up to `limit` JPEG/PNG files of `directory` (sorted by name), each through the server's own
    decode, resize and crop and then normalised as the runner does: float32 arrays (1, 3, H, W)."""
    try:
        paths = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as exc:
        raise StartupError(
            f"int8 calibration: cannot read the directory {directory} ({exc.strerror or exc}); "
            "point --calibration-images at a readable directory of JPEG or PNG photos"
        ) from None
    arrays: list[np.ndarray] = []
    for path in paths:
        if len(arrays) == limit:
            break
        try:
            image = preprocess(path.read_bytes(), preprocessing, max_pixels=max_pixels)
        except ServeError as exc:
            logger.warning("calibration image %s skipped: %s", path, exc.message)
            continue
        arrays.append(normalised(image, preprocessing))
    if not arrays:
        raise StartupError(
            f"int8 calibration: {directory} has no usable JPEG or PNG image; "
            "put a few dozen photos like the ones served there (--calibration-images), or drop --quantize int8"
        )
    return arrays


def normalised(image: torch.Tensor, preprocessing: Preprocessing) -> np.ndarray:
    """A uint8 (3, H, W) image as the runner feeds it to the model: float32 (1, 3, H, W), scaled to
    [0, 1], minus the mean, over the std (the same operations, in the same order)."""
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1)
    x = image.unsqueeze(0).to(torch.float32).div_(255)
    x.sub_(mean).div_(std)
    array: np.ndarray = x.numpy()
    return array
