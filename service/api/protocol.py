"""uvicorn's HTTP protocol with a cap on the bytes one request head (line and headers) may take.

httptools, the fast parser uvicorn[standard] picks, has no such limit: a 1 MB header was accepted and a
200 MB one grew the process by 250 MB. Counting the bytes fed while a head is incomplete bounds that
at the cap plus one read, without giving up httptools' speed. h11 has its own limit
(`h11_max_incomplete_event_size`), which the CLI sets when httptools is not installed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class BoundedHeadHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._reading_head = True

    def on_message_begin(self) -> None:
        self._reading_head = True
        self._head_bytes = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._reading_head or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > self.max_head_bytes:
            self._refuse_head()

    def _refuse_head(self) -> None:
        message = f"the request line and headers are over the limit of {self.max_head_bytes} bytes"
        body = json.dumps({"code": 431, "type": "RequestHeaderFieldsTooLarge", "message": message}).encode()
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()


def bounded_protocol(max_head_bytes: int) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn.Config(http=...), with the given cap."""
    return type("BoundedHttpTools", (BoundedHeadHttpToolsProtocol,), {"max_head_bytes": max_head_bytes})
