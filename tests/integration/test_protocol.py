"""The HTTP protocol's limits against a real uvicorn on 127.0.0.1, spoken to with raw sockets.

A tiny echo app stands behind it, so these tests need no model: each server starts in a thread in
well under a second. The head timeout is 1 s; the assertions allow many seconds more, and assert
only that a slow client is cut off after the timeout, not how soon after.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, BinaryIO, NamedTuple

import pytest
import uvicorn

from service.api.protocol import bounded_protocol

pytestmark = pytest.mark.integration

HEAD_TIMEOUT_S = 1.0
MAX_HEAD_BYTES = 4096
PATIENCE_S = 15.0  # how long a test waits for the server, far past any timeout it sets


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers every request with the path and the number of body bytes it read."""
    assert scope["type"] == "http"
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"path": scope["path"], "body_bytes": size}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Running(NamedTuple):
    port: int
    server: uvicorn.Server


@contextlib.contextmanager
def running(head_timeout_s: float = PATIENCE_S * 4, max_connections: int | None = None) -> Iterator[Running]:
    """uvicorn with the bounded protocol, serving `echo_app` from a thread until the block ends."""
    config = uvicorn.Config(
        echo_app,
        http=bounded_protocol(max_head_bytes=MAX_HEAD_BYTES, head_timeout_s=head_timeout_s),
        lifespan="off",
        log_level="error",
        limit_concurrency=max_connections,
        timeout_keep_alive=int(PATIENCE_S * 4),  # idle keep-alive connections stay, unless we close them
    )
    server = uvicorn.Server(config)
    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "the server to start")
        yield Running(listener.getsockname()[1], server)
    finally:
        server.should_exit = True
        thread.join(PATIENCE_S)
        listener.close()


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < deadline, f"waited {PATIENCE_S} s for {what}"
        time.sleep(0.01)


class Connection:
    """A raw client socket with a buffered reader, so pipelined answers are read one at a time."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE_S)
        self.reader: BinaryIO = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, dict[str, str], dict[str, Any]]:
        status_line = self.reader.readline()
        assert status_line, "the server closed the connection without an answer"
        headers = {}
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.reader.read(int(headers["content-length"]))
        return int(status_line.split()[1]), headers, json.loads(body)

    def rest(self) -> bytes:
        """What the server sends until it closes the connection (a socket timeout if it never does)."""
        return self.reader.read()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def request(path: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def assert_error(answer: tuple[int, dict[str, str], dict[str, Any]], code: int, type_: str) -> str:
    status, headers, body = answer
    assert status == code, answer
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert set(body) == {"code", "type", "message"} and (body["code"], body["type"]) == (code, type_), body
    message: str = body["message"]
    return message


def assert_answered(port: int) -> None:
    with Connection(port) as connection:
        connection.send(request("/ok", b"abc"))
        assert connection.response()[::2] == (200, {"path": "/ok", "body_bytes": 3})


# --- the head timeout ---------------------------------------------------------------------------


def test_half_a_head_is_answered_408_and_closed_after_the_head_timeout():
    with running(head_timeout_s=HEAD_TIMEOUT_S) as served:
        started = time.monotonic()
        with Connection(served.port) as slow:
            slow.send(request("/slow")[:30])  # the request line and part of one header, then nothing
            message = assert_error(slow.response(), 408, "RequestTimeout")
            assert time.monotonic() - started >= HEAD_TIMEOUT_S
            assert "request line and headers" in message
            assert slow.rest() == b""
        assert_answered(served.port)


def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout():
    with running(head_timeout_s=HEAD_TIMEOUT_S) as served:
        started = time.monotonic()
        with Connection(served.port) as silent:
            assert silent.rest() == b""  # closed, and with nothing asked there is no answer
            assert time.monotonic() - started >= HEAD_TIMEOUT_S


def test_a_later_request_on_a_keep_alive_connection_is_timed_from_its_first_byte():
    with running(head_timeout_s=HEAD_TIMEOUT_S) as served, Connection(served.port) as connection:
        connection.send(request("/first", b"12345"))
        assert connection.response()[::2] == (200, {"path": "/first", "body_bytes": 5})
        connection.send(request("/second")[:25])
        started = time.monotonic()
        assert_error(connection.response(), 408, "RequestTimeout")
        assert time.monotonic() - started >= HEAD_TIMEOUT_S * 0.9  # the timer started at the server's read
        assert connection.rest() == b""


def test_a_head_sent_in_pieces_within_the_timeout_is_answered():
    with running(head_timeout_s=PATIENCE_S) as served, Connection(served.port) as connection:
        head = request("/pieces", b"xyz")
        for start in range(0, len(head), 10):
            connection.send(head[start : start + 10])
        assert connection.response()[::2] == (200, {"path": "/pieces", "body_bytes": 3})


def test_fifty_slow_header_clients_are_all_cut_off_and_others_still_served():
    with running(head_timeout_s=HEAD_TIMEOUT_S) as served, contextlib.ExitStack() as stack:
        slow = [stack.enter_context(Connection(served.port)) for _ in range(50)]
        for connection in slow:
            connection.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        wait_for(lambda: len(served.server.server_state.connections) == 50, "the server to accept all 50")
        # Wait on all 50 at once until the server has closed each.
        received = {connection.sock: b"" for connection in slow}
        with selectors.DefaultSelector() as selector:
            for sock in received:
                selector.register(sock, selectors.EVENT_READ)
            deadline = time.monotonic() + HEAD_TIMEOUT_S + PATIENCE_S
            while selector.get_map() and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=0.5):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    data = sock.recv(65536)
                    received[sock] += data
                    if not data:
                        selector.unregister(sock)
            still_open = len(selector.get_map())
        assert still_open == 0, f"{still_open} of 50 slow-header connections still open"
        assert all(data.startswith(b"HTTP/1.1 408 ") for data in received.values())
        assert len(served.server.server_state.connections) == 0
        assert_answered(served.port)


# --- the connection cap -------------------------------------------------------------------------


def test_over_the_connection_cap_the_answer_is_a_json_503_and_the_cap_is_exact():
    with running(max_connections=2) as served, Connection(served.port) as first:
        with Connection(served.port) as second:
            for number, connection in enumerate((first, second)):  # within the cap: answered, kept alive
                connection.send(request(f"/held{number}"))
                assert connection.response()[0] == 200
            with Connection(served.port) as third:
                third.send(request("/third", b"body"))
                answer = third.response()
                message = assert_error(answer, 503, "ServiceUnavailable")
                assert "connection limit of 2" in message and answer[1]["retry-after"] == "1"
                assert third.rest() == b""
        wait_for(lambda: len(served.server.server_state.connections) < 2, "the server to see two connections go")
        assert_answered(served.port)


# --- pipelining against the head cap ------------------------------------------------------------


def test_a_pipelined_body_does_not_count_toward_the_next_head():
    """The first request's body (nearly the head cap) and half of the next head in one send."""
    with running() as served, Connection(served.port) as connection:
        body = b"b" * (MAX_HEAD_BYTES - 100)
        second = request("/second", b"2nd", X_Trace="t" * 100)
        connection.send(request("/first", body) + second[:60])
        assert connection.response()[::2] == (200, {"path": "/first", "body_bytes": len(body)})
        connection.send(second[60:])
        assert connection.response()[::2] == (200, {"path": "/second", "body_bytes": 3})
        # Many pipelined requests with bodies at the cap, in one send, cut anywhere by the reads.
        connection.send(b"".join(request(f"/r{i}", b"x" * MAX_HEAD_BYTES) for i in range(20)))
        for i in range(20):
            assert connection.response()[::2] == (200, {"path": f"/r{i}", "body_bytes": MAX_HEAD_BYTES})


def test_an_oversized_head_is_still_431():
    with running() as served:
        for padding in (MAX_HEAD_BYTES, 1 << 20):  # whole in one read, and over many
            with Connection(served.port) as connection:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    connection.send(request("/big", X_Padding="p" * padding))
                message = assert_error(connection.response(), 431, "RequestHeaderFieldsTooLarge")
                assert str(MAX_HEAD_BYTES) in message


@pytest.mark.parametrize("header_lines", [1, 200], ids=["one-long-header", "many-short-headers"])
def test_an_oversized_head_after_a_pipelined_body_is_still_431(header_lines):
    """The head begins mid-read, after a body: it is counted from there, and refused past the cap."""
    with running() as served, Connection(served.port) as connection:
        head = request("/big").removesuffix(b"\r\n")
        padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * (MAX_HEAD_BYTES // 10)) for i in range(header_lines))
        connection.send(request("/first", b"b" * (MAX_HEAD_BYTES - 100)) + head + padding[: MAX_HEAD_BYTES // 2])
        assert connection.response()[0] == 200
        # Keep the head growing until the server says something; it must be the 431.
        rest, sent = padding[MAX_HEAD_BYTES // 2 :] + b"p" * (1 << 20), 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < len(rest) and not _readable(connection):
                connection.send(rest[sent : sent + 1024])
                sent += 1024
        assert_error(connection.response(), 431, "RequestHeaderFieldsTooLarge")
        assert sent < len(rest) // 2, f"{sent} bytes of head went out before the 431"


def _readable(connection: Connection) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(connection.sock, selectors.EVENT_READ)
        return bool(selector.select(timeout=0.01))
