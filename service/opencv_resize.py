"""OpenCV's bilinear resize, as mmcv's `imresize` calls it for mmpretrain's ImageNet pipelines.

With OpenCV installed (`pip install resnet-serve[opencv]`), it is OpenCV's own `cv2.resize`, so the
pixels equal the original pipeline's. Without it, torch samples the same 2x2 neighbours with the same
half-pixel mapping and no antialiasing, but in float32 where OpenCV rounds 11-bit fixed-point weights:
about one pixel in ten lands one level off (docs/models.md measures what that does to probabilities).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import numpy as np
import torch


@functools.cache
def _cv2() -> ModuleType | None:
    try:
        module = importlib.import_module("cv2")
    except ImportError:
        return None
    return module


def implementation() -> str:
    """What resizes for the opencv backend here, for /models."""
    cv2 = _cv2()
    return f"OpenCV {cv2.__version__}" if cv2 is not None else "torch (OpenCV-compatible; install resnet-serve[opencv])"


def opencv_bilinear(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 CHW `image` resized to `size` = (height, width) as `cv2.resize(INTER_LINEAR)` does."""
    if tuple(image.shape[1:]) == size:
        return image
    cv2 = _cv2()
    if cv2 is None:
        return torch_bilinear(image, size)
    height, width = size
    pixels = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    resized = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(resized).permute(2, 0, 1).contiguous()


def torch_bilinear(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    resized = torch.nn.functional.interpolate(
        image.unsqueeze(0).float(), size=size, mode="bilinear", align_corners=False, antialias=False
    )
    return resized.squeeze(0).round_().clamp_(0, 255).to(torch.uint8)
