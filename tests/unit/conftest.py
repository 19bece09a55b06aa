"""Fixtures for the unit tests."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest


class OneFile(http.server.BaseHTTPRequestHandler):
    """Serves `body` for any GET: a stand-in for download.pytorch.org."""

    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def file_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OneFile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()
