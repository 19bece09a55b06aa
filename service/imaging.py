"""Bytes in, a uint8 CHW tensor out: decode (EXIF-aware, any mode to RGB, pixel caps), resize, crop.

Pure functions, run in a thread pool by the edge. The resize and crop are the Pillow calls that
torchvision's weights transforms make on a PIL image, with the same sizes and crop box, so the
server's input to the model is bit-identical to the reference pipeline's (tests/unit/test_imaging.py
holds them to torchvision); normalisation happens on the device (see the runner). torchvision itself
is not imported: its `ops` pull in torch._dynamo, about 165 MiB of RSS that serving never uses.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import InvalidInput, UnsupportedMediaType
from service.opencv_resize import implementation as opencv_implementation
from service.opencv_resize import opencv_bilinear

# Formats a photo upload can be in (JPEG covers MPO). Leaving out EPS matters: Pillow renders it with Ghostscript.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "ICO")

# Our own pixel cap (checked from the header, before decoding) replaces Pillow's global warning.
Image.MAX_IMAGE_PIXELS = None
# Pillow warns about damaged metadata (e.g. "Corrupt EXIF data") while opening and loading uploads; we
# decide on errors alone, and a warning per hostile upload would be log spam (or, under -W error, a
# crash). A process-wide filter, set once, because catch_warnings() is not thread-safe before 3.14 and
# decoding runs in a thread pool. Inserted first, so it holds under `-W error` too.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class Interpolation(StrEnum):
    """A resize filter, by the names (and values) of torchvision's `InterpolationMode`."""

    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"

    @property
    def pil(self) -> Image.Resampling:
        return Image.Resampling[self.name]


class ResizeBackend(StrEnum):
    PIL = "pil"  # Pillow's resize, as torchvision's and mmcv's `backend="pillow"` transforms call it
    OPENCV = "opencv"  # OpenCV's INTER_LINEAR: bilinear from the 2x2 nearest pixels, no antialiasing


class ResizeMode(StrEnum):
    SHORT_EDGE = "short-edge"  # the shorter side to resize_size, the aspect ratio kept
    SQUARE = "square"  # both sides to resize_size (mmpretrain's `Resize(scale=N)`)
    NONE = "none"  # no resize: the model's pipeline takes images at its input size (CIFAR)


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation transform of a set of weights: resize, centre crop, then mean and std (0-1
    scale). The defaults are torchvision's `ImageClassification`."""

    resize_size: int = 256
    crop_size: int = 224
    interpolation: Interpolation = Interpolation.BILINEAR
    antialias: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    backend: ResizeBackend = ResizeBackend.PIL
    mode: ResizeMode = ResizeMode.SHORT_EDGE

    def __post_init__(self) -> None:
        if self.mode is not ResizeMode.NONE and self.resize_size < self.crop_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than crop_size {self.crop_size}")

    @property
    def is_torchvision_like(self) -> bool:
        """Whether the device decoder's resize (torchvision's, on the GPU) reproduces this one."""
        return self.backend is ResizeBackend.PIL and self.mode is ResizeMode.SHORT_EDGE

    def describe(self) -> str:
        if self.mode is ResizeMode.NONE:
            resize = f"resize to {self.crop_size} (short edge) only when the image differs"
        elif self.mode is ResizeMode.SQUARE:
            resize = f"resize to {self.resize_size}x{self.resize_size}"
        else:
            resize = f"resize the short edge to {self.resize_size}"
        backend = opencv_implementation() if self.backend is ResizeBackend.OPENCV else "Pillow"
        method = f"{backend}, {self.interpolation}" + ("" if self.antialias else ", no antialias")
        mean = ", ".join(f"{m * 255:g}" for m in self.mean)
        std = ", ".join(f"{s * 255:g}" for s in self.std)
        return f"{resize} ({method}), centre crop {self.crop_size}, mean [{mean}], std [{std}] (0-255)"


def decode(data: bytes, *, max_pixels: int) -> Image.Image:
    """Open and fully decode an upload into an RGB image, refusing what is not a sane photo."""
    image = _open_checked(data, max_pixels=max_pixels)
    try:
        image.load()
        return _to_rgb(_apply_exif_orientation(image))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"the image could not be decoded: {_short(exc)}") from None


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG upload whose header passed the host's checks, left for the model's device to decode."""

    data: torch.Tensor  # the file's bytes, 1-D uint8, on the host
    orientation: int  # EXIF orientation: 1 (as stored) to 8


# What the batcher carries to the runner: a decoded image, or a JPEG for the device to decode.
ModelInput = torch.Tensor | EncodedJpeg

# JPEG colour modes the device decoder turns into RGB as Pillow would; CMYK and the like, and
# progressive files, take the host path.
_DEVICE_JPEG_MODES = frozenset({"RGB", "L"})
_EXIF_ORIENTATION = 0x0112


def inspect_jpeg(data: bytes, spec: Preprocessing, *, max_pixels: int) -> EncodedJpeg | None:
    """The checks of `preprocess` that need only the header; None when the device cannot decode
    the file, which then takes the host path. Raises the same errors `preprocess` would."""
    image = _open_checked(data, max_pixels=max_pixels)
    if image.format != "JPEG" or image.mode not in _DEVICE_JPEG_MODES or image.info.get("progressive"):
        return None
    if not spec.is_torchvision_like:
        return None
    try:
        orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a corrupt EXIF block: the host path ignores it too
        orientation = 1
    orientation = orientation if 1 <= orientation <= 8 else 1
    width, height = image.size
    if orientation >= 5:  # a quarter turn: the stored width is the shown height
        width, height = height, width
    _check_resizable(width, height, spec, max_pixels)
    return EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation)


def _open_checked(data: bytes, *, max_pixels: int) -> Image.Image:
    if not data:
        raise InvalidInput("the image is empty (0 bytes)")
    try:
        image: Image.Image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise UnsupportedMediaType(
            f"the upload is not an image in a supported format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(f"the image header is corrupt: {_short(exc)}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidInput(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidInput(f"the image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    return image


def _check_resizable(width: int, height: int, spec: Preprocessing, max_pixels: int) -> None:
    if spec.mode is not ResizeMode.SHORT_EDGE:
        return  # a fixed output size
    short, long = sorted((width, height))
    resized_long = int(spec.resize_size * long / short)
    if resized_long * spec.resize_size > max_pixels:
        raise InvalidInput(
            f"the image is {width}x{height}: its aspect ratio is too extreme to resize "
            f"(the shorter side at {spec.resize_size} px makes the longer one {resized_long} px)"
        )


def to_model_input(image: Image.Image, spec: Preprocessing, *, max_pixels: int) -> torch.Tensor:
    """Resize the shorter side, center-crop, and return a uint8 tensor of shape (3, crop, crop)."""
    _check_resizable(image.width, image.height, spec, max_pixels)
    size = _resized_size(image.width, image.height, spec)
    if spec.backend is ResizeBackend.OPENCV and size is not None:
        resized = opencv_bilinear(pil_to_tensor(image), size)
        top, left = _crop_origin(resized.shape[1], resized.shape[2], spec.crop_size)
        return resized[:, top : top + spec.crop_size, left : left + spec.crop_size]
    if size is not None and size != (image.height, image.width):
        # Pillow always antialiases; torchvision's `antialias` flag applies to tensors only.
        image = image.resize((size[1], size[0]), spec.interpolation.pil)
    top, left = _crop_origin(image.height, image.width, spec.crop_size)
    return pil_to_tensor(image.crop((left, top, left + spec.crop_size, top + spec.crop_size)))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8, a view of a copy of the pixels: torchvision's `pil_to_tensor` for RGB."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def _crop_origin(height: int, width: int, crop: int) -> tuple[int, int]:
    """Top and left of the centred crop, rounded as torchvision's `center_crop` rounds them."""
    if crop > height or crop > width:
        # Every resize mode leaves the short side at least at the crop (Preprocessing checks it).
        raise InvalidInput(f"the image is {width}x{height} after resizing, smaller than the {crop} px crop")
    return round((height - crop) / 2.0), round((width - crop) / 2.0)


def _resized_size(width: int, height: int, spec: Preprocessing) -> tuple[int, int] | None:
    """(height, width) after the resize, or None for none. The short edge's rounding (down) is
    torchvision's and mmcv's `ResizeEdge`'s alike."""
    if spec.mode is ResizeMode.SQUARE:
        return spec.resize_size, spec.resize_size
    target = spec.crop_size if spec.mode is ResizeMode.NONE else spec.resize_size
    if spec.mode is ResizeMode.NONE and width == height == target:
        return None
    if width <= height:
        return int(target * height / width), target
    return target, int(target * width / height)


def preprocess(data: bytes, spec: Preprocessing, *, max_pixels: int) -> torch.Tensor:
    return to_model_input(decode(data, max_pixels=max_pixels), spec, max_pixels=max_pixels)


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    # In place: otherwise Pillow returns a copy of every image, turned or not (8 % of decode time).
    # A corrupt EXIF block must not cost the caller the image itself.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow clips 16-bit samples to 255 when converting; scale them down instead.
        wide = np.asarray(image, dtype=np.int64)
        eight_bit = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(eight_bit).convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]
