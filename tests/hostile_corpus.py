"""A corpus of hostile and awkward uploads, built by code, each with the statuses a server may answer.

Nothing here is a committed binary: every item is made with Pillow, numpy, struct and zlib from a
fixed seed, so the corpus is the same on every machine and a reader can see how each attack is built.
`corpus()` returns the items; tests/integration/test_hostile_inputs.py sends each to a live server.

`expected` is a set because some inputs are legitimately either "corrupt" (400) or "not an image"
(415) depending on how far the decoder gets; `mentions` are words of which at least one must appear
(case-insensitively) in the message of a 4xx body, so the caller is told what is wrong.
"""

from __future__ import annotations

import functools
import io
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# The server's defaults (service/config.py); the bombs claim far more, the awkward shapes fit.
DEFAULT_MAX_PIXELS = 50_000_000

OK = frozenset({200})
BAD = frozenset({400})
NOT_AN_IMAGE = frozenset({415})

NOT_AN_IMAGE_WORDS = ("not an image",)

CORRUPT_WORDS = ("corrupt", "decoded", "truncated")

# What no response body may carry: a traceback, or a path that tells an attacker about the host.
FORBIDDEN_IN_RESPONSES = ("Traceback", "/work/", "site-packages", str(Path(__file__).resolve().parents[1]), sys.prefix)
BOMB_WORDS = ("pixels", "over the limit")


@dataclass(frozen=True)
class Hostile:
    name: str
    data: bytes
    expected: frozenset[int]
    mentions: tuple[str, ...] = ()
    # Set when the server is known to get this item wrong: the tests mark it xfail(strict=True).
    known_bug: str | None = None

    def __repr__(self) -> str:  # pytest ids and failure messages stay short
        return f"Hostile({self.name!r}, {len(self.data)} bytes, expected {sorted(self.expected)})"


# --- building blocks -------------------------------------------------------------------------------


def picture(width: int = 96, height: int = 64, seed: int = 0) -> np.ndarray:
    """A gradient with noise: enough entropy that a JPEG of it has real Huffman-coded data."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(0, 64, (height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def rgb(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(picture(width, height, seed))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_with_header(width: int, height: int, *, extra_chunks: bytes = b"") -> bytes:
    """An 8-bit RGB PNG whose IHDR (valid CRC) claims `width` x `height`, with a few real scanlines."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * min(width, 64)) * 4)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + extra_chunks + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def jpeg_segments(data: bytes) -> dict[int, int]:
    """Offsets of the first segment of each marker in a JPEG's header (up to the scan)."""
    found: dict[int, int] = {}
    offset = 2
    while offset + 4 <= len(data) and data[offset] == 0xFF:
        marker = data[offset + 1]
        found.setdefault(marker, offset)
        if marker == 0xDA:
            break
        (length,) = struct.unpack(">H", data[offset + 2 : offset + 4])
        offset += 2 + length
    return found


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real baseline JPEG whose SOF0 frame header is rewritten to claim `width` x `height`."""
    data = bytearray(encode(rgb(), "JPEG", quality=90))
    sof = jpeg_segments(bytes(data))[0xC0]
    # FFC0, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def jpeg_with_corrupt_huffman_table() -> bytes:
    """Overwrite the 16 code-length counts of the first DHT: they now sum far past 256 symbols."""
    data = bytearray(encode(rgb(), "JPEG", quality=90))
    dht = jpeg_segments(bytes(data))[0xC4]
    # FFC4, length (2), class/id (1), then 16 counts
    data[dht + 5 : dht + 21] = b"\xff" * 16
    return bytes(data)


def gif_with_size(width: int, height: int) -> bytes:
    """A GIF whose logical screen and single image descriptor both claim `width` x `height`."""
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    # LZW minimum code size 2, one sub-block: clear code, a pixel, end-of-information
    image_data = b"\x02\x02\x44\x01\x00"
    return header + descriptor + image_data + b";"


def bmp_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(rgb(8, 8), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def tiff_with_size(width: int, height: int) -> bytes:
    """A little-endian TIFF with only the IFD entries a reader needs, claiming `width` x `height`."""
    entries = [
        (256, 4, 1, width),  # ImageWidth, LONG
        (257, 4, 1, height),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # Photometric: min-is-black
        (273, 4, 1, 8 + 2 + 12 * 8 + 4),  # StripOffsets: right after the IFD
        (277, 3, 1, 1),  # SamplesPerPixel
        (279, 4, 1, 16),  # StripByteCounts
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00" + b"\x80" * 16


def webp_with_size(width: int, height: int) -> bytes:
    """A real lossless WebP whose VP8L header (14-bit width-1, 14-bit height-1) claims `width` x `height`."""
    data = bytearray(encode(rgb(16, 16), "WEBP", lossless=True))
    assert data[12:16] == b"VP8L" and data[20] == 0x2F, "Pillow wrote a simple lossless WebP"
    bits = int.from_bytes(data[21:25], "little")
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    data[21:25] = bits.to_bytes(4, "little")
    return bytes(data)


def exif_jpeg(orientation: int, size: tuple[int, int] = (40, 20)) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "resnet-serve test camera"  # Make
    return encode(rgb(*size), "JPEG", quality=90, exif=exif.tobytes())


def jpeg_with_corrupt_exif() -> bytes:
    """An EXIF block whose IFD entry count and offsets are garbage: the image itself is fine."""
    data = bytearray(exif_jpeg(6))
    start = data.find(b"Exif\x00\x00")
    tiff = start + 6
    # Keep the TIFF byte-order mark, ruin the IFD offset and everything after it for 40 bytes.
    data[tiff + 4 : tiff + 44] = b"\xff" * 40
    return bytes(data)


def jpeg_with_exif_offset_past_the_end() -> bytes:
    data = bytearray(exif_jpeg(3))
    start = data.find(b"Exif\x00\x00")
    byte_order = bytes(data[start + 6 : start + 8])
    fmt = "<I" if byte_order == b"II" else ">I"
    data[start + 10 : start + 14] = struct.pack(fmt, 0x7FFFFFF0)
    return bytes(data)


def animated(fmt: str, frames: int = 3, **options: object) -> bytes:
    images = [rgb(48, 32, seed) for seed in range(frames)]
    return encode(images[0], fmt, save_all=True, append_images=images[1:], **options)


def png_zlib_bomb(width: int, height: int) -> bytes:
    """A PNG within the pixel cap whose IDAT is all zeros: tiny on the wire, width x height x 3 decoded."""
    raw = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)
    parts = [raw.compress(row) for _ in range(height)]
    parts.append(raw.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b"")


def png_text_bomb(kind: bytes) -> bytes:
    """A zTXt or iCCP chunk before the image data that inflates to 16 MiB of zeros (Pillow stops at 1 MiB)."""
    inflated = zlib.compress(b"\x00" * (16 << 20), 9)
    payload = b"Comment\x00\x00" + inflated if kind == b"zTXt" else b"icc\x00\x00" + inflated
    return png_with_header(32, 32, extra_chunks=png_chunk(kind, payload))


def not_an_image(name: str, data: bytes) -> Hostile:
    return Hostile(name, data, NOT_AN_IMAGE, NOT_AN_IMAGE_WORDS)


# --- the corpus ------------------------------------------------------------------------------------


@functools.cache
def corpus() -> tuple[Hostile, ...]:
    jpeg = encode(rgb(256, 192), "JPEG", quality=90)
    png = encode(rgb(256, 192), "PNG")
    items = [
        Hostile("zero-bytes", b"", BAD, ("empty", "no image")),
        Hostile("truncated-jpeg-half", jpeg[: len(jpeg) // 2], BAD, CORRUPT_WORDS),
        Hostile("truncated-jpeg-in-header", jpeg[:120], BAD | NOT_AN_IMAGE, (*CORRUPT_WORDS, *NOT_AN_IMAGE_WORDS)),
        Hostile("truncated-png-half", png[: len(png) // 2], BAD, CORRUPT_WORDS),
        Hostile("truncated-png-after-ihdr", png[:33], BAD | NOT_AN_IMAGE, (*CORRUPT_WORDS, *NOT_AN_IMAGE_WORDS)),
        Hostile("jpeg-corrupt-huffman-table", jpeg_with_corrupt_huffman_table(), BAD, CORRUPT_WORDS),
        not_an_image("text", b"just some text, not a picture\n" * 10),
        Hostile(
            "pdf",
            b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
            NOT_AN_IMAGE,
            NOT_AN_IMAGE_WORDS,
        ),
        not_an_image("elf-header", b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00\x3e\x00" + bytes(44)),
        not_an_image("html", b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>"),
        Hostile(
            "svg",
            b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><text>&x;</text></svg>',
            NOT_AN_IMAGE,
            NOT_AN_IMAGE_WORDS,
        ),
        # EPS is a format Pillow knows, rendered by running Ghostscript on it: the server must refuse it.
        not_an_image("eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"),
        # A real image in a format Pillow reads but the server does not allow.
        not_an_image("pcx-not-allowed", encode(rgb(), "PCX")),
        # Decompression bombs: the header claims billions of pixels; refused before any decoding.
        Hostile("png-ihdr-100000x100000", png_with_header(100_000, 100_000), BAD, BOMB_WORDS),
        Hostile("gif-65535x65535", gif_with_size(65_535, 65_535), BAD, BOMB_WORDS),
        Hostile("jpeg-sof-65535x65535", jpeg_with_size(65_535, 65_535), BAD, BOMB_WORDS),
        Hostile("bmp-65535x65535", bmp_with_size(65_535, 65_535), BAD, BOMB_WORDS),
        Hostile("tiff-100000x100000", tiff_with_size(100_000, 100_000), BAD, BOMB_WORDS),
        Hostile("webp-vp8l-16384x16384", webp_with_size(16_384, 16_384), BAD, BOMB_WORDS),
        Hostile("ppm-100000x100000", b"P6\n100000 100000\n255\n" + bytes(300), BAD, BOMB_WORDS),
        # Zlib bombs inside the pixel cap or in metadata: small on the wire, large inflated.
        Hostile("png-zlib-bomb-2000x2000", png_zlib_bomb(2_000, 2_000), OK),
        # Pillow refuses text/profile chunks that inflate past MAX_TEXT_CHUNK (400); skipping them (200) is fine too.
        Hostile("png-ztxt-16mib", png_text_bomb(b"zTXt"), OK | BAD, CORRUPT_WORDS),
        Hostile("png-iccp-16mib", png_text_bomb(b"iCCP"), OK | BAD, CORRUPT_WORDS),
        # Awkward but legal shapes and modes.
        Hostile("1x1", encode(rgb(1, 1), "PNG"), OK),
        Hostile("20000x3", encode(rgb(20_000, 3), "PNG"), BAD, ("aspect ratio",)),
        Hostile("3x20000", encode(rgb(3, 20_000), "PNG"), BAD, ("aspect ratio",)),
        Hostile("png-16-bit-I;16", encode(Image.fromarray(picture()[..., 0].astype(np.uint16) * 257), "PNG"), OK),
        Hostile("jpeg-cmyk", encode(rgb().convert("CMYK"), "JPEG", quality=90), OK),
        Hostile("png-palette-transparency", encode(rgb().convert("P"), "PNG", transparency=0), OK),
        Hostile("png-LA", encode(rgb().convert("LA"), "PNG"), OK),
        Hostile("gif-animated", animated("GIF", duration=50, loop=0), OK),
        Hostile("webp-animated", animated("WEBP", duration=50, loop=0, lossless=True), OK),
        Hostile("tiff-multipage", animated("TIFF"), OK),
        Hostile("jpeg-corrupt-exif", jpeg_with_corrupt_exif(), OK),
        Hostile("jpeg-exif-offset-past-end", jpeg_with_exif_offset_past_the_end(), OK),
    ]
    items += [Hostile(f"jpeg-exif-orientation-{o}", exif_jpeg(o), OK) for o in range(1, 9)]
    for item in items:
        assert item.expected == OK or item.mentions, f"{item.name}: say which words name the problem"
    names = [item.name for item in items]
    assert len(names) == len(set(names)), "corpus names must be unique"
    return tuple(items)
