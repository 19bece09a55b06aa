"""A real resnet-serve process on a free loopback port, for tests that attack a live server (the
benchmarks' harness: spawn, readiness, psutil stats, parsed metrics)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from benchmarks.harness import http, load
from benchmarks.harness.server import ServerProcess, free_port, serving
from benchmarks.harness.server import spawn as spawn_server

LiveServer = ServerProcess

__all__ = ["LiveServer", "free_port", "multipart_request", "open_loop", "running", "spawn", "wait_ready"]


def spawn(weights_dir: Path, log_path: Path, *args: str, env: dict[str, str] | None = None) -> LiveServer:
    """Start `python -m service serve` (resnet18v1) without waiting for readiness."""
    return spawn_server(weights_dir, log_path, *args, env=env)


def wait_ready(server: LiveServer, timeout_s: float = 60) -> None:
    server.wait_ready(timeout_s)


@contextlib.contextmanager
def running(weights_dir: Path, log_path: Path, *args: str) -> Iterator[LiveServer]:
    with serving(weights_dir, log_path, *args) as server:
        yield server


def multipart_request(image: bytes, *, path: str = "/resnet18v1/predict", declared: int | None = None) -> bytes:
    """A complete HTTP/1.1 request (Connection: close) uploading `image` in the `data` field."""
    return http.multipart_request(image, route=path, declared=declared)


async def open_loop(port: int, request: bytes, *, rate: float, duration_s: float) -> list[tuple[int, float]]:
    """Fire `request` at a fixed arrival rate for `duration_s`, whatever the answers: (status,
    seconds) each, status 0 for a reset or no answer. Raw bytes on fresh connections are far cheaper
    than an HTTP client library, so a load test on the server's own cores measures the server."""
    results = await load.burst(port, [request], rate, duration_s)
    return [(int(status) if status.isdigit() else 0, seconds) for status, seconds in results]
