"""Property tests of the decoder on hostile bytes: it refuses (400/415) or returns a model input, nothing else.

Whatever the upload, `preprocess` must either raise `InvalidInput` / `UnsupportedMediaType` (which
the edge turns into 400 / 415) or return a (3, 224, 224) uint8 tensor. Any other exception would
be a 500 for the caller. The inputs: arbitrary bytes, arbitrary bytes behind each allowed format's
magic number (so every Pillow plugin's parser is reached), and real images with flipped bits,
overwritten bytes and truncations (kitten_small.jpg, and small PNG, GIF, WebP, TIFF, BMP, ICO, PPM).

The example counts are small so the module runs in well under 30 s in CI. To fuzz longer by hand:

    DECODER_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/unit/test_decoder_fuzz.py -q

Hypothesis keeps failing examples in .hypothesis/ and replays them first on the next run.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.errors import InvalidInput, UnsupportedMediaType
from service.imaging import Preprocessing, decode, preprocess
from tests.conftest import KITTEN_SMALL
from tests.hostile_corpus import jpeg_with_corrupt_exif, png_with_header

MAX_PIXELS = 50_000_000
SPEC = Preprocessing()
EXAMPLES = int(os.environ.get("DECODER_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # Building mutants of a 10 KB photo is slow by Hypothesis's measure, and that is fine here.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def small(fmt: str, mode: str = "RGB", size: tuple[int, int] = (32, 24), **options: object) -> bytes:
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


SEEDS: dict[str, bytes] = {
    "kitten_small.jpg": KITTEN_SMALL.read_bytes(),
    "small.png": small("PNG"),
    "small-palette.png": small("PNG", "P", transparency=3),
    "small.gif": small("GIF", "P"),
    "small.webp": small("WEBP", lossless=True),
    "small-lossy.webp": small("WEBP", quality=50),
    "small.tiff": small("TIFF", compression="tiff_deflate"),
    "small.bmp": small("BMP"),
    "small.ico": small("ICO", sizes=[(32, 24)]),
    "small.ppm": small("PPM"),
}

# The first bytes by which Pillow recognises each allowed format.
MAGICS = [
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"RIFF\x00\x00\x00\x00WEBPVP8L",
    b"RIFF\x00\x00\x00\x00WEBPVP8X",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
    b"\x00\x00\x01\x00",
    b"P6\n",
    b"P5\n",
    b"P1\n",
]


def outcome(data: bytes) -> torch.Tensor | None:
    """The model input, or None for a refusal the edge answers with 400 or 415; anything else raises.

    Warnings are not errors here, as they are not in the server: Pillow warns on some damaged files
    (a corrupt EXIF block) and what matters is the answer. `test_decode_lets_no_warning_escape`
    covers the warnings.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tensor = preprocess(data, SPEC, max_pixels=MAX_PIXELS)
        except (InvalidInput, UnsupportedMediaType) as refusal:
            message = refusal.message
        else:
            message = None
    if message is not None:
        assert message.strip(), "a refusal says why"
        return None
    assert tensor.shape == (3, SPEC.crop_size, SPEC.crop_size)
    assert tensor.dtype == torch.uint8
    return tensor


@FUZZ
@given(st.binary(max_size=4096))
@example(b"")
@example(b"\xff\xd8")
@example(b"\x89PNG\r\n\x1a\n")
def test_arbitrary_bytes(data):
    outcome(data)


@FUZZ
@given(st.sampled_from(MAGICS), st.binary(max_size=2048))
@example(b"GIF89a", b"\x01\x00\x01\x00\x00\x00\x00;")
@example(b"\x89PNG\r\n\x1a\n", png_with_header(0, 1)[8:])
def test_arbitrary_bytes_behind_a_format_magic(magic, rest):
    outcome(magic + rest)


@st.composite
def mutants(draw: st.DrawFn) -> bytes:
    """A real image with a few bits flipped, a few bytes overwritten, and perhaps a cut-off tail."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    # Most of a format's parsing happens in its first few hundred bytes: aim half the hits there.
    positions = st.one_of(st.integers(0, min(len(data), 512) - 1), st.integers(0, len(data) - 1))
    for position in draw(st.lists(positions, max_size=6)):
        data[position] ^= 1 << draw(st.integers(0, 7))
    for position in draw(st.lists(positions, max_size=3)):
        data[position] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


@FUZZ
@given(mutants())
def test_mutated_real_images(data):
    outcome(data)


@settings(max_examples=max(20, EXAMPLES // 10), deadline=None)
@given(st.integers(1, 4000), st.integers(1, 64), st.sampled_from(["PNG", "GIF", "BMP"]), st.booleans())
def test_any_shape_is_served_or_refused_for_its_aspect_ratio(long_side, short_side, fmt, portrait):
    size = (short_side, long_side) if portrait else (long_side, short_side)
    buffer = io.BytesIO()
    Image.new("RGB" if fmt != "GIF" else "P", size).save(buffer, format=fmt)
    if outcome(buffer.getvalue()) is None:
        # The only refusal a well-formed image of under 50 M pixels may get is its aspect ratio.
        with pytest.raises(InvalidInput, match="aspect ratio"):
            preprocess(buffer.getvalue(), SPEC, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_is_served_untouched(name):
    assert outcome(SEEDS[name]) is not None


def test_decode_lets_no_warning_escape(tmp_path):
    """Pillow warns about a corrupt EXIF block inside Image.open; service.imaging ignores Pillow's
    UserWarnings process-wide (catch_warnings is not thread-safe), which must hold even under -W error."""
    path = tmp_path / "corrupt-exif.jpg"
    path.write_bytes(jpeg_with_corrupt_exif())
    script = (
        "import sys; from service.imaging import decode; "
        "print(decode(open(sys.argv[1], 'rb').read(), max_pixels=10**8).mode)"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", script, str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "RGB"
    assert decode(path.read_bytes(), max_pixels=MAX_PIXELS).mode == "RGB"  # and under pytest's filters


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("GIF", {"duration": 50, "loop": 0}), ("WEBP", {"lossless": True, "duration": 50}), ("TIFF", {})],
)
def test_an_animation_or_multipage_file_is_served_by_its_first_frame(fmt, options):
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    frames = [Image.new("RGB", (40, 30), colour) for colour in colours]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], **options)
    image = decode(buffer.getvalue(), max_pixels=MAX_PIXELS)
    red, green, blue = image.getpixel((20, 15))
    assert red > 200 and green < 60 and blue < 60, (fmt, image.getpixel((20, 15)))


def device_outcome(data: bytes) -> torch.Tensor | None:
    """The `--decode-on-device` route (header on the host, pixels by torchvision's decoder, here on
    the CPU device, host fallback), which must also refuse or serve and never raise anything else."""
    from service.imaging import inspect_jpeg
    from service.models.device_decode import decode_batch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            encoded = inspect_jpeg(data, SPEC, max_pixels=MAX_PIXELS)
        except (InvalidInput, UnsupportedMediaType):
            return None
        if encoded is None:  # not for the device: the host path, fuzzed above
            return outcome(data)
        (tensor,) = decode_batch([encoded], SPEC, torch.device("cpu"))
    if tensor is None:  # the device decoder gave up: the host path decides
        return outcome(data)
    assert tensor.shape == (3, SPEC.crop_size, SPEC.crop_size)
    assert tensor.dtype == torch.uint8
    return tensor


@FUZZ
@given(mutants())
def test_mutated_real_images_through_the_device_decoder(data):
    device_outcome(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_behind_a_jpeg_magic_through_the_device_decoder(rest):
    device_outcome(b"\xff\xd8\xff" + rest)
