"""uvicorn's httptools protocol with the limits an edge facing the public needs on every connection.

- **Head size.** httptools, the fast parser uvicorn[standard] picks, has no limit on the request line
  and headers: a 1 MB header was accepted and a 200 MB one grew the process by 250 MB. The bytes read
  while a head is incomplete are counted, and past `max_head_bytes` the client gets 431 and the
  connection closes. That bounds a head's memory at the cap plus one read, without giving up
  httptools' speed. Only bytes of the head count: under pipelining, one read can hold the end of the
  previous request's body and the start of the next head. A head that arrives whole in one read is
  measured when complete (its URL and headers), and refused with the same 431.
- **Head time.** A client that sends its head slowly (or not at all) would hold its connection and
  its file descriptor forever; uvicorn times only the idle gap between keep-alive requests. The head
  must be complete within `head_timeout_s`, counted from the connection for the first request and
  from the first byte for each later one. Then the client gets 408 if any of its head arrived (it
  sent something, so it gets an answer), and the connection simply closes if nothing did.
- **Connection cap.** Over `limit_concurrency` (`--max-connections`), uvicorn answers 503 in plain
  text and counts the connection asking against the limit, so N meant N - 1. Here N connections are
  served, and the 503 is the JSON error body every other refusal has.

h11 has its own size limit (`h11_max_incomplete_event_size`), which the CLI sets when httptools is not
installed; the head timeout and the JSON 503 exist only here.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import ServiceUnavailable


class BoundedHeadHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = 64 * 1024
    head_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_message = False  # some of a request has been read and not all of it
        self._head_open = False  # ... and its head is not complete
        self._head_bytes = 0
        self._heads_begun_this_read = 0
        self._head_timer: asyncio.TimerHandle | None = None
        # The connection cap is checked here, not by uvicorn (see the module's docstring).
        self.max_connections = self.limit_concurrency
        self.limit_concurrency = None
        self._service_app = self.app

    # --- the connection -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()  # the first head is timed from the connection, so silence counts

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        between_requests = not self._in_message
        self._heads_begun_this_read = 0
        super().data_received(data)
        if not self._head_open or self.transport.is_closing():
            return
        # Every byte of this read belongs to the open head when that head was open before it, or
        # began it. Otherwise the read held the end of an earlier request first; of the new head it
        # counts what the parser has handed over (URL and complete headers), which stays a lower bound.
        if self._heads_begun_this_read == 0 or (between_requests and self._heads_begun_this_read == 1):
            self._head_bytes += len(data)
        else:
            self._head_bytes = self._parsed_head_bytes()
        if self._head_bytes > self.max_head_bytes:
            self._refuse(431, "RequestHeaderFieldsTooLarge", self._too_large_message())
        elif self._head_timer is None:
            self._start_head_timer()  # a head left incomplete by a read: timed from its first byte

    # --- parser callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = True
        self._head_open = True
        self._head_bytes = 0
        self._heads_begun_this_read += 1
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._stop_head_timer()
        refusal = self._refusal()
        if refusal is None:
            super().on_headers_complete()
            return
        # uvicorn reads `self.app` here to start (or queue, behind a response in flight) this request's
        # task: the refusal is answered in turn, like any response, and closes the connection.
        self.app = refusal
        try:
            super().on_headers_complete()
        finally:
            self.app = self._service_app

    def on_message_complete(self) -> None:
        self._in_message = False
        super().on_message_complete()

    def _parsed_head_bytes(self) -> int:
        """The URL and the complete headers the parser has handed over: a lower bound of the head's size."""
        return len(self.url) + sum(len(name) + len(value) for name, value in self.headers)

    # --- the head timer -------------------------------------------------------------------------

    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # An earlier request on this connection is still being answered, and uvicorn stops
            # reading behind a pipelined one: the wait is ours, not the client's. Look again later.
            self._start_head_timer()
            return
        if not self._in_message:
            self.transport.close()  # nothing was asked, so there is nothing to answer
            return
        self._refuse(408, "RequestTimeout", f"the request line and headers took over {self.head_timeout_s:g} s")

    # --- refusals -------------------------------------------------------------------------------

    def _too_large_message(self) -> str:
        return f"the request line and headers are over the limit of {self.max_head_bytes} bytes"

    def _refuse(self, status: int, type_: str, message: str) -> None:
        """Answer while a head is incomplete, where no request task exists yet, and close the connection."""
        self._stop_head_timer()
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        body = _error_body(status, type_, message)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, reason, len(body))
            + body
        )
        self.transport.close()

    def _refusal(self) -> ASGI3Application | None:
        """The app that refuses a request whose head is complete, or None to serve it."""
        if self._parsed_head_bytes() > self.max_head_bytes:
            # A head that came whole in one read was never counted while it was open.
            return _refusal_app(431, "RequestHeaderFieldsTooLarge", self._too_large_message())
        cap = self.max_connections
        # `connections` holds this one too: the cap is passed only by a connection beyond it.
        if cap is not None and (len(self.connections) > cap or len(self.tasks) >= cap):
            self.logger.warning("over the connection limit of %d; answered 503", cap)
            message = f"the server is over its connection limit of {cap}; retry shortly"
            return _refusal_app(ServiceUnavailable.status, ServiceUnavailable.type, message, retry_after_s=1)
        return None


def _refusal_app(status: int, type_: str, message: str, retry_after_s: int | None = None) -> ASGI3Application:
    """An ASGI app that answers every request with this JSON error and closes the connection."""
    body = _error_body(status, type_, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after_s is not None:
        headers.append((b"retry-after", str(retry_after_s).encode()))
    headers.append((b"connection", b"close"))

    async def refuse(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return refuse


def _error_body(status: int, type_: str, message: str) -> bytes:
    return json.dumps({"code": status, "type": type_, "message": message}).encode()


def bounded_protocol(max_head_bytes: int, head_timeout_s: float = 10.0) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn.Config(http=...), with the given head limits.

    The connection cap is uvicorn.Config's `limit_concurrency`, which this protocol reads.
    """
    attributes = {"max_head_bytes": max_head_bytes, "head_timeout_s": head_timeout_s}
    return type("BoundedHttpTools", (BoundedHeadHttpToolsProtocol,), attributes)
