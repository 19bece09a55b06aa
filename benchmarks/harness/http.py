"""Raw HTTP/1.1 for load: multipart uploads built once as bytes, a one-shot `Connection: close`
exchange, and a minimal keep-alive client on asyncio streams (tens of microseconds of CPU a
request, so the generator is never the bottleneck; httpx is there for comparison)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from benchmarks.photos import Photo

REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Target:
    """Where to send the load: base URL, route and the multipart field name of the image."""

    url: str
    route: str = "/resnet18v1/predict"
    field: str = "data"
    metrics_path: str | None = "/metrics"
    name: str = ""

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def label(self) -> str:
        return self.name or f"{self.url}{self.route}"


def multipart_body(
    image: bytes, field_name: str, filename: str, *, boundary: str | None = None, part_type: str | None = "image/jpeg"
) -> tuple[bytes, str]:
    """A one-part multipart/form-data body and its Content-Type (a fresh boundary unless given)."""
    boundary = boundary or uuid.uuid4().hex
    part_head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
    if part_type is not None:
        part_head += f"Content-Type: {part_type}\r\n"
    body = (part_head + "\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def multipart_request(
    image: bytes,
    *,
    route: str = "/resnet18v1/predict",
    host: str = "127.0.0.1",
    field_name: str = "data",
    filename: str = "k.jpg",
    boundary: str = "b0undary",
    part_type: str | None = "image/jpeg",
    declared: int | None = None,
    headers: Sequence[str] = ("Connection: close",),
) -> bytes:
    """A complete HTTP/1.1 POST (head and body) uploading `image`; `declared` overrides the
    Content-Length, for requests that lie about their size."""
    body, content_type = multipart_body(image, field_name, filename, boundary=boundary, part_type=part_type)
    head = "".join(
        [f"POST {route} HTTP/1.1\r\n", f"Host: {host}\r\n", *(f"{line}\r\n" for line in headers),
         f"Content-Length: {declared if declared is not None else len(body)}\r\n",
         f"Content-Type: {content_type}\r\n\r\n"]
    )  # fmt: skip
    return head.encode() + body


def raw_request(target: Target, photo: Photo) -> bytes:
    """The keep-alive request for one photo, built once and reused."""
    body, content_type = multipart_body(photo.data, target.field, f"{photo.name}.jpg")
    head = (
        f"POST {target.route} HTTP/1.1\r\n"
        f"Host: {target.host}:{target.port}\r\n"
        "User-Agent: resnet-serve-loadgen\r\n"
        "Accept: application/json\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def one_shot(port: int, request: bytes, *, hang_up: bool = False, timeout_s: float = 120) -> str:
    """Send a whole `Connection: close` request on a fresh connection and return the status as text
    ('refused', 'error' for a reset or timeout, 'hung-up' when told to leave without reading)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return "refused"
    try:
        writer.write(request)
        await writer.drain()
        if hang_up:
            return "hung-up"
        response = await asyncio.wait_for(reader.read(), timeout=timeout_s)
        return response[9:12].decode() or "empty"
    except (OSError, TimeoutError):
        return "error"
    finally:
        writer.close()


class ConnectionClosed(Exception):
    pass


class RawConnection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def request(self, payload: bytes) -> tuple[int, bytes]:
        """Send a prebuilt request; return (status, body). Retries once on a stale keep-alive socket."""
        for attempt in (0, 1):
            fresh = self._writer is None
            if fresh:
                await self._open()
            try:
                return await self._exchange(payload)
            except (ConnectionClosed, ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError):
                self.close()
                if fresh or attempt == 1:
                    raise
        raise AssertionError("unreachable")

    async def _exchange(self, payload: bytes) -> tuple[int, bytes]:
        assert self._reader is not None
        assert self._writer is not None
        self._writer.write(payload)
        await self._writer.drain()
        try:
            head = await self._reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise ConnectionClosed() from None
            raise
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self._reader.readexactly(int(headers["content-length"]))
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked()
        else:  # body runs to the end of the connection
            body = await self._reader.read()
            self.close()
            return status, body
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, body

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        chunks: list[bytes] = []
        while True:
            size_line = await self._reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")  # trailers are not expected; eat the final CRLF
                return b"".join(chunks)
            chunks.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)


class Sender:
    """Sends prebuilt requests over keep-alive connections, raw asyncio streams or httpx."""

    def __init__(self, target: Target, photos: Sequence[Photo], client: str = "raw") -> None:
        self.target = target
        self.client = client
        self.payloads = [raw_request(target, p) for p in photos]
        self.bodies = [multipart_body(p.data, target.field, f"{p.name}.jpg") for p in photos]
        self._idle: deque[RawConnection] = deque()
        self._httpx: Any = None
        self.sample: Any = None

    async def __aenter__(self) -> Sender:
        if self.client == "httpx":
            import httpx

            self._httpx = httpx.AsyncClient(
                base_url=self.target.url,
                timeout=REQUEST_TIMEOUT_S,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=1024),
            )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        while self._idle:
            self._idle.pop().close()
        if self._httpx is not None:
            await self._httpx.aclose()

    async def send(self, index: int) -> tuple[int, bytes]:
        if self._httpx is not None:
            body, content_type = self.bodies[index]
            response = await self._httpx.post(self.target.route, content=body, headers={"content-type": content_type})
            return response.status_code, response.content
        connection = self._idle.pop() if self._idle else RawConnection(self.target.host, self.target.port)
        try:
            result = await connection.request(self.payloads[index])
        except BaseException:
            connection.close()
            raise
        self._idle.append(connection)
        return result

    def keep_sample(self, status: int, body: bytes) -> None:
        if self.sample is None and status == 200:
            try:
                self.sample = json.loads(body)
            except ValueError:
                self.sample = body[:200].decode("latin-1")
