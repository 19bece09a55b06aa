"""JPEG decode, EXIF orientation, resize and crop on the model's device (nvJPEG on CUDA).

Behind `--decode-on-device`. On a GPU host the CPU, not the GPU, is the wall: JPEG decoding costs a
few milliseconds of a core per photo, and the GPU's JPEG decoder does a whole batch in one call.
The host still reads each header (format, size, caps, orientation) so that bad uploads get the same
4xx as on the host path; only the pixels are decoded here.

The result differs from the host path's by rounding (another IDCT, and torchvision's tensor resize
instead of Pillow's): a pixel moves by at most about one level, so it is not bit-identical with the
reference pipeline, and it is off by default. torchvision 0.29 deprecates its decoders in favour of
TorchCodec's `decode_jpeg`, which has the same signature: `_decode` is the one place to change.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from service.imaging import EncodedJpeg, Preprocessing

warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"The image decoding and encoding capabilities")


def decode_batch(
    encoded: Sequence[EncodedJpeg], spec: Preprocessing, device: torch.device
) -> list[torch.Tensor | None]:
    """A (3, crop, crop) uint8 tensor on `device` for each JPEG, or None where the device decoder
    failed on it (the caller then tries the host path, which decides whether the file is bad)."""
    decoded: list[torch.Tensor | None]
    try:
        decoded = list(_decode([item.data for item in encoded], device))
    except RuntimeError:  # one bad file fails the whole call: find it, keep the others
        decoded = [_decode_alone(item, device) for item in encoded]
    return [
        None if image is None else _resize_and_crop(orient(image, item.orientation), spec)
        for image, item in zip(decoded, encoded, strict=True)
    ]


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1 to 8) to a (C, H, W) tensor, as Pillow's exif_transpose does."""
    height, width = -2, -1
    if orientation == 2:
        return image.flip(width)
    if orientation == 3:
        return image.flip(height).flip(width)
    if orientation == 4:
        return image.flip(height)
    if orientation == 5:
        return image.transpose(height, width)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(height, width))
    if orientation == 7:
        return image.transpose(height, width).flip(height).flip(width)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(height, width))
    return image


def _decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return images if isinstance(images, list) else [images]


def _decode_alone(item: EncodedJpeg, device: torch.device) -> torch.Tensor | None:
    try:
        return _decode([item.data], device)[0]
    except RuntimeError:
        return None


def _resize_and_crop(image: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    resized = F.resize(image, [spec.resize_size], interpolation=spec.interpolation, antialias=spec.antialias)
    cropped: torch.Tensor = F.center_crop(resized, [spec.crop_size])
    return cropped
