"""Read the images out of a request body while it streams in, never past the byte cap.

Multipart bodies go through python-multipart's push parser chunk by chunk, so a 50 MB upload is
refused at the first chunk past the limit (or at once, from Content-Length) rather than buffered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import InvalidInput, PayloadTooLarge

IMAGE_FIELD = "data"


@dataclass
class UploadLimits:
    max_bytes: int
    max_images: int


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0

    @property
    def field_name(self) -> str | None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        return name.decode("latin-1") if name is not None else None


class _MultipartCollector:
    """Callbacks for the push parser: keeps `data` parts, counts every part against the limit."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self.images: list[bytes] = []
        self.other_fields: list[str] = []
        self.parts_seen = 0
        self.ended = False  # the closing boundary was read
        self._part = _Part()
        self._header_field = b""
        self._header_value = b""

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_end": self._on_end,
        }

    def _on_part_begin(self) -> None:
        self.parts_seen += 1
        if self.parts_seen > self.limits.max_images:
            raise InvalidInput(f"too many parts in one request: the limit is {self.limits.max_images} images a request")
        self._part = _Part()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._part.headers[self._header_field.lower()] = self._header_value
        self._header_field = b""
        self._header_value = b""

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._part.chunks.append(data[start:end])

    def _on_part_end(self) -> None:
        name = self._part.field_name
        if name == IMAGE_FIELD:
            self.images.append(b"".join(self._part.chunks))
        else:
            self.other_fields.append(repr(name) if name is not None else "a part without a name")
        self._part = _Part()

    def _on_end(self) -> None:
        self.ended = True


async def read_images(
    content_type: str, content_length: str | None, body: AsyncIterator[bytes], limits: UploadLimits
) -> list[bytes]:
    """The uploaded images, in upload order: the `data` parts of a multipart form, or the raw body."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limits.max_bytes:
        raise _too_large(limits, int(content_length))
    media_type, options = parse_options_header(content_type)
    if media_type == b"multipart/form-data":
        return await _read_multipart(options.get(b"boundary"), body, limits)
    if media_type == b"application/x-www-form-urlencoded":
        raise InvalidInput(
            f"send the image as multipart/form-data in the field {IMAGE_FIELD!r} "
            f"(curl -F {IMAGE_FIELD}=@photo.jpg) or as a raw body, not URL-encoded"
        )
    raw = await _read_capped(body, limits)
    if not raw:
        raise InvalidInput(
            f"no image: send it in the multipart field {IMAGE_FIELD!r} (curl -F {IMAGE_FIELD}=@photo.jpg) "
            "or as the raw request body"
        )
    return [raw]


async def _capped(body: AsyncIterator[bytes], limits: UploadLimits) -> AsyncIterator[bytes]:
    """The body's chunks, refused with 413 at the first one past the byte cap."""
    total = 0
    async for chunk in body:
        total += len(chunk)
        if total > limits.max_bytes:
            raise _too_large(limits, None)
        yield chunk


async def _read_capped(body: AsyncIterator[bytes], limits: UploadLimits) -> bytes:
    return b"".join([chunk async for chunk in _capped(body, limits)])


async def _read_multipart(boundary: bytes | None, body: AsyncIterator[bytes], limits: UploadLimits) -> list[bytes]:
    if not boundary:
        raise InvalidInput("the multipart/form-data Content-Type has no boundary parameter")
    collector = _MultipartCollector(limits)
    try:
        parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
        async for chunk in _capped(body, limits):
            parser.write(chunk)
        parser.finalize()  # it does not check that the body was complete; `ended` does
    except MultipartParseError as exc:
        raise InvalidInput(f"the multipart body is malformed: {str(exc)[:200]}") from None
    except ValueError as exc:  # python-multipart raises it for a bad boundary
        raise InvalidInput(f"the multipart body is malformed: {str(exc)[:200]}") from None
    if collector.parts_seen and not collector.ended:
        # The part in progress never ended: answering with the parts before it would drop an image
        # from a reply that clients read by position.
        raise InvalidInput(
            f"the multipart body ended before its closing boundary --{boundary.decode('latin-1')}--: "
            "it was cut short, so send the whole body again"
        )
    if not collector.images:
        found = ", ".join(collector.other_fields[:5]) or "no parts at all"
        raise InvalidInput(f"no image in the multipart field {IMAGE_FIELD!r}; the request had {found}")
    return collector.images


def _too_large(limits: UploadLimits, declared: int | None) -> PayloadTooLarge:
    size = f" ({declared} bytes declared)" if declared is not None else ""
    return PayloadTooLarge(f"the upload is over the limit of {limits.max_bytes} bytes{size}")
