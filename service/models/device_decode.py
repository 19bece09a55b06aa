"""JPEG decode, EXIF orientation, resize and crop on the model's device (nvJPEG on CUDA).

Behind `--decode-on-device`. On a GPU host the CPU, not the GPU, is the wall: JPEG decoding costs a
few milliseconds of a core per photo, and the GPU's JPEG decoder does many files in one call.
The host still reads each header (format, size, caps, orientation) so that bad uploads get the same
4xx as on the host path; only the pixels are decoded here.

The result differs from the host path's by rounding (another IDCT, and torchvision's tensor resize
instead of Pillow's): a pixel moves by at most about one level, so it is not bit-identical with the
reference pipeline, and it is off by default. torchvision 0.29 deprecates its decoders in favour of
TorchCodec's `decode_jpeg`, which has the same signature: `_decode` is the one place to change.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from service.errors import InsufficientStorage
from service.imaging import EncodedJpeg, Preprocessing

warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"The image decoding and encoding capabilities")

# The decoded (full-size, RGB) bytes one decoder call may return at once. The batched call hands
# back every image of its input at full size, so a whole batch in one call held them all until the
# last was resized: 64 photos at the 50-megapixel cap are about 9.6 GB. In calls of at most this
# much, each image is resized as soon as its call returns, and a call's full-size images are given
# back before the next call: the peak is one call's worth (or one image, if that is larger) plus
# the resize's own working copy of one image. Ordinary photos still go many to a call (forty
# 12-megapixel ones in a batch: six calls), where the hardware decoder's batching pays.
DECODE_CHUNK_BYTES = 256 * 2**20
_HEADER_BYTES = 64 * 2**10

# One image's outcome: its (3, crop, crop) uint8 tensor on the device; InsufficientStorage when the
# device ran out of memory turning it into one (that image fails alone); None when the decoder
# rejected the file or had no memory to decode it (the caller then tries the host path, which
# decides whether the file is bad).
Decoded = torch.Tensor | InsufficientStorage | None


def decode_batch(encoded: Sequence[EncodedJpeg], spec: Preprocessing, device: torch.device) -> list[Decoded]:
    """Each JPEG decoded, turned upright, resized and cropped on `device`, in order."""
    outcomes: list[Decoded] = []
    for chunk in _chunks(encoded, DECODE_CHUNK_BYTES):
        outcomes.extend(_decode_chunk(chunk, spec, device))
    return outcomes


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


def _chunks(encoded: Sequence[EncodedJpeg], budget_bytes: int) -> Iterator[list[EncodedJpeg]]:
    chunk: list[EncodedJpeg] = []
    total = 0
    for item in encoded:
        size = _decoded_bytes(item)
        if chunk and total + size > budget_bytes:
            yield chunk
            chunk, total = [], 0
        chunk.append(item)
        total += size
    if chunk:
        yield chunk


def _decoded_bytes(item: EncodedJpeg) -> int:
    """The file's size once decoded to RGB, from its header (Pillow reads no pixels here). The
    headers nearly always end within the first 64 KiB; reading only those keeps this off the cost of
    copying a large file (a 10 MB one costs milliseconds, on the thread that feeds the model)."""
    data = item.data.numpy()
    for head in (data[:_HEADER_BYTES], data):
        try:
            with Image.open(io.BytesIO(head.tobytes())) as image:
                width, height = image.size
        except Exception:  # a header cut short by the prefix (or, after the host read it, anything)
            continue
        return 3 * width * height
    return DECODE_CHUNK_BYTES  # unknown: a call of its own


def _decode_chunk(chunk: list[EncodedJpeg], spec: Preprocessing, device: torch.device) -> list[Decoded]:
    decoded: list[torch.Tensor | None]
    try:
        decoded = list(_decode([item.data for item in chunk], device))
    except RuntimeError:  # one bad file fails the whole call: find it, keep the others
        decoded = [_decode_alone(item, device) for item in chunk]
    outcomes: list[Decoded] = []
    for index, item in enumerate(chunk):
        image, decoded[index] = decoded[index], None  # the full-size image lives only while resized
        outcomes.append(None if image is None else _fit(image, item.orientation, spec))
        del image
    return outcomes


def _fit(image: torch.Tensor, orientation: int, spec: Preprocessing) -> torch.Tensor | InsufficientStorage:
    """Orient, resize and crop one image; out of device memory, that image alone fails."""
    height, width = image.shape[-2:]
    try:
        return _resize_and_crop(orient(image, orientation), spec)
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
        if not _is_out_of_memory(exc):
            raise
    return InsufficientStorage(f"the device ran out of memory resizing this {width}x{height} image")


def _is_out_of_memory(exc: RuntimeError) -> bool:
    message = str(exc)  # CUDA's allocator says "out of memory"; the CPU's "can't allocate memory"
    return isinstance(exc, torch.cuda.OutOfMemoryError) or any(
        words in message for words in ("out of memory", "can't allocate memory")
    )


def _decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    if device.type == "cuda":
        # nvJPEG takes its output memory from the caller's stream's pool but writes it from a
        # stream of its own (pytorch/vision, torchcodec issues). That pool hands a freed block to
        # the next allocation at once, because later work on the same stream is ordered after
        # whatever still reads the block; nvJPEG's writes are not. The previous call's or batch's
        # full-size images are freed while their resizes and copies are still queued on this
        # stream, so nvJPEG could overwrite pixels those have yet to read. Waiting for this
        # stream's queued work first leaves no block in its pool that anything still reads. The
        # outputs themselves are safe: torchvision makes this stream wait for the decoder's before
        # returning, and only this stream reads them (the staged batch is recorded on the compute
        # stream by the runner).
        torch.cuda.current_stream(device).synchronize()
    images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return images if isinstance(images, list) else [images]


def _decode_alone(item: EncodedJpeg, device: torch.device) -> torch.Tensor | None:
    try:
        return _decode([item.data], device)[0]
    except RuntimeError:
        return None


def _resize_and_crop(image: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    interpolation = InterpolationMode(spec.interpolation.value)
    resized = F.resize(image, [spec.resize_size], interpolation=interpolation, antialias=spec.antialias)
    cropped: torch.Tensor = F.center_crop(resized, [spec.crop_size])
    return cropped
