"""Reading uploads out of a streamed body: a multipart body cut short is refused, never shortened."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from service.api.uploads import UploadLimits, read_images
from service.errors import InvalidInput

BOUNDARY = b"b0undary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY.decode()}"
LIMITS = UploadLimits(max_bytes=1 << 20, max_images=8)
IMAGES = [b"\xff\xd8first image" + bytes(range(256)), b"\x89PNGsecond image" + bytes(range(255, -1, -1))]


def part(data: bytes, name: bytes = b"data") -> bytes:
    return (
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="' + name + b'"; filename="x"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    )  # fmt: skip


COMPLETE = b"".join(part(image) for image in IMAGES) + b"--" + BOUNDARY + b"--\r\n"


async def chunks_of(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def read(body: bytes, chunk_size: int = 1 << 16) -> list[bytes]:
    return await read_images(CONTENT_TYPE, str(len(body)), chunks_of(body, chunk_size), LIMITS)


@pytest.mark.parametrize("chunk_size", [1 << 16, 7, 1])
async def test_a_complete_body_gives_every_image_in_order(chunk_size):
    assert await read(COMPLETE, chunk_size) == IMAGES


@pytest.mark.parametrize("chunk_size", [1 << 16, 7])
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(COMPLETE[: -len(b"--" + BOUNDARY + b"--\r\n")], id="no-closing-boundary"),
        pytest.param(COMPLETE[: -len(b"--\r\n")], id="closing-boundary-without-its-dashes"),
        pytest.param(COMPLETE[: len(part(IMAGES[0])) + 150], id="cut-inside-the-second-image"),
        pytest.param(COMPLETE[: len(part(IMAGES[0])) + 20], id="cut-inside-the-second-part-headers"),
        pytest.param(part(IMAGES[0]), id="one-part-and-no-closing-boundary"),
    ],
)
async def test_a_body_cut_before_its_closing_boundary_is_refused(body, chunk_size):
    with pytest.raises(InvalidInput, match="ended before its closing boundary") as refused:
        await read(body, chunk_size)
    assert refused.value.status == 400
    assert f"--{BOUNDARY.decode()}--" in refused.value.message


async def test_a_body_without_any_part_still_says_there_is_no_image():
    with pytest.raises(InvalidInput, match="no image"):
        await read(b"")
    with pytest.raises(InvalidInput, match="no image"):
        await read(b"--" + BOUNDARY + b"--\r\n")


async def test_an_epilogue_after_the_closing_boundary_is_allowed():
    assert await read(COMPLETE + b"an epilogue, which RFC 2046 allows\r\n") == IMAGES
