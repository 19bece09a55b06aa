"""A real resnet-serve process on a free loopback port, for tests that attack a live server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value from /metrics (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def spawn(weights_dir: Path, log_path: Path, *args: str, env: dict[str, str] | None = None) -> LiveServer:
    """Start `python -m service serve` without waiting for readiness."""
    port = free_port()
    command = [
        sys.executable, "-m", "service", "serve", "--models", "resnet18v1", "--weights-dir", str(weights_dir),
        "--host", "127.0.0.1", "--port", str(port), *args,
    ]  # fmt: skip
    log = log_path.open("wb")
    process = subprocess.Popen(
        command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    log.close()
    return LiveServer(process, port, log_path)


def wait_ready(server: LiveServer, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.url}/ping", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"server not ready after {timeout_s}s:\n{server.log()}")


@contextlib.contextmanager
def running(weights_dir: Path, log_path: Path, *args: str) -> Iterator[LiveServer]:
    server = spawn(weights_dir, log_path, *args)
    try:
        wait_ready(server)
        yield server
    finally:
        server.stop()


def multipart_request(image: bytes, *, path: str = "/resnet18v1/predict", declared: int | None = None) -> bytes:
    """A complete HTTP/1.1 request (Connection: close) uploading `image` in the `data` field."""
    boundary = b"b0undary"
    payload = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="data"; filename="k.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n--" + boundary + b"--\r\n"
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Length: {declared if declared is not None else len(payload)}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary.decode()}\r\n\r\n"
    ).encode()
    return head + payload


async def raw_exchange(port: int, request: bytes) -> tuple[int, float]:
    """Send pre-encoded bytes on a fresh connection; (status, seconds). Far cheaper than an HTTP
    client library, so a load test on the server's own cores measures the server, not the client."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        response = await reader.read()
    except ConnectionError:  # a reset instead of an answer: status 0, for the caller to count
        return 0, time.perf_counter() - started
    finally:
        writer.close()
    return int(response[9:12]) if response else 0, time.perf_counter() - started


async def open_loop(port: int, request: bytes, *, rate: float, duration_s: float) -> list[tuple[int, float]]:
    """Fire `request` at a fixed arrival rate for `duration_s`, whatever the answers."""
    tasks: list[asyncio.Task[tuple[int, float]]] = []
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < duration_s:
        for _ in range(int(elapsed * rate) + 1 - len(tasks)):
            tasks.append(asyncio.create_task(raw_exchange(port, request)))
        await asyncio.sleep(0.002)
    return list(await asyncio.gather(*tasks))
