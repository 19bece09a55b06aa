"""`serve --workers N`: several processes on one port, summed metrics, one drain, fail-fast."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from service.models.catalog import CATALOG
from service.models.weights import write_random
from tests.conftest import REPO
from tests.http.test_correctness import assert_matches, reference_probabilities
from tests.integration.live import LiveServer, spawn, wait_ready

pytestmark = pytest.mark.integration


def worker_pids(server: LiveServer) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    workers = []
    for child in psutil.Process(server.pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if any("spawn_main" in arg for arg in child.cmdline()):
                workers.append(child.pid)
    return workers


async def post_all(server: LiveServer, images: list[bytes]) -> list[httpx.Response]:
    # One connection per request, so that the kernel spreads them over the workers' accepts.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
        return await asyncio.gather(
            *(http.post("/resnet18v1/predict?topk=3", files={"data": ("i.jpg", image)}) for image in images)
        )


def test_two_workers_answer_correctly_and_sum_their_metrics(weights, tmp_path, photos):
    metrics_dir = tmp_path / "prometheus"
    server = spawn(
        weights, tmp_path / "server.log", "--workers", "2", env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    )
    try:
        wait_ready(server)
        pids = worker_pids(server)
        names = ["kitten.jpg", "chelsea.jpg", "coffee.jpg"]
        responses = asyncio.run(post_all(server, [photos[names[i % 3]] for i in range(24)]))
        counted = server.metric("resnet_serve_requests_total", model="resnet18v1", route="predict", code="200")
        capacity = server.metric("resnet_serve_queue_capacity", model="resnet18v1")
        ready = server.metric("resnet_serve_ready")
        files = sorted(path.name for path in metrics_dir.glob("counter_*.db"))
        # Each worker's own process figures, not just those of the worker that answers the scrape.
        memory = [server.metric("process_resident_memory_bytes", pid=str(pid)) for pid in pids]
        cpu = [server.metric("process_cpu_seconds_total", pid=str(pid)) for pid in pids]
    finally:
        code = server.stop()
    assert len(pids) == 2, server.log()
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        expected = reference_probabilities(weights, "resnet18v1", "resnet18", photos[names[i % 3]])
        assert_matches(response.json()["prediction"][0], expected, 3)
    assert counted == 24  # each worker counts its own; /metrics sums both, whichever answers
    assert capacity == 2 * 64
    assert ready == 1
    assert files == sorted(f"counter_{pid}.db" for pid in pids)
    assert all(rss > 100e6 for rss in memory), memory  # each holds a resnet18 and torch
    assert all(seconds > 0 for seconds in cpu), cpu
    assert code == 0, server.log()


def test_sigterm_drains_every_worker_and_exits_0(weights, tmp_path, photos):
    server = spawn(weights, tmp_path / "server.log", "--workers", "2", "--shutdown-grace-s", "20")
    try:
        wait_ready(server)
        pids = worker_pids(server)

        async def scenario() -> list[httpx.Response]:
            requests = asyncio.create_task(post_all(server, [photos["kitten.jpg"]] * 16))
            await asyncio.sleep(0.3)  # admitted and queued behind the forwards
            server.process.send_signal(signal.SIGTERM)
            return await requests

        responses = asyncio.run(scenario())
        code = server.process.wait(timeout=25)
    finally:
        server.stop(signal.SIGKILL)
    assert [r.status_code for r in responses] == [200] * 16
    assert code == 0, server.log()
    assert not any(psutil.pid_exists(pid) for pid in pids)
    assert server.log().count("draining (grace") == 2


def test_a_worker_that_dies_stops_the_whole_server_with_exit_1(weights, tmp_path):
    server = spawn(weights, tmp_path / "server.log", "--workers", "2")
    try:
        wait_ready(server)
        survivor, victim = worker_pids(server)
        os.kill(victim, signal.SIGKILL)
        code = server.process.wait(timeout=30)
    finally:
        server.stop(signal.SIGKILL)
    assert code == 1
    assert f"(pid {victim}) exited with code -9" in server.log()
    assert not psutil.pid_exists(survivor)


def test_a_startup_failure_in_the_workers_exits_1_with_one_clear_line(tmp_path):
    weights = tmp_path / "w"
    path = write_random(CATALOG["resnet18v1"], 0, weights)
    path.write_bytes(path.read_bytes()[:5000])
    server = spawn(weights, tmp_path / "server.log", "--workers", "2")
    started = time.monotonic()
    try:
        code = server.process.wait(timeout=60)
    finally:
        server.stop(signal.SIGKILL)
    log = server.log()
    assert code == 1, log
    assert time.monotonic() - started < 60
    assert "is not a readable checkpoint" in log
    assert "Traceback" not in log


def test_sigterm_while_the_workers_load_is_a_clean_exit(weights, tmp_path):
    server = spawn(weights, tmp_path / "server.log", "--workers", "2")
    try:
        deadline = time.monotonic() + 30
        while len(worker_pids(server)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(worker_pids(server)) == 2
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(timeout=30)
    finally:
        server.stop(signal.SIGKILL)
    assert code == 0, server.log()
    assert "exited with code" not in server.log()


def test_a_worker_that_will_not_stop_is_killed_after_the_grace_period(weights, tmp_path):
    server = spawn(weights, tmp_path / "server.log", "--workers", "2", "--shutdown-grace-s", "1")
    try:
        wait_ready(server)
        frozen, other = worker_pids(server)
        os.kill(frozen, signal.SIGSTOP)  # a worker that can no longer act on SIGTERM
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(timeout=40)
    finally:
        server.stop(signal.SIGKILL)
    assert code == 1
    assert f"(pid {frozen}) did not stop in time: killing it" in server.log()
    assert not psutil.pid_exists(frozen) and not psutil.pid_exists(other)


def test_a_port_in_use_is_one_clear_line(weights, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "service", "serve", "--weights-dir", str(weights), "--workers", "2",
             "--port", str(port)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_weights_are_obtained_once_for_all_workers(tmp_path):
    """N workers must not make N downloads (nor, under fetch-or-random, write different random files)."""
    import http.server

    gets: list[str] = []

    class Mirror(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            gets.append(self.path)
            body = b"not the official checkpoint"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    mirror = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    mirror.daemon_threads = True
    threading.Thread(target=mirror.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{mirror.server_address[1]}/"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "service", "serve", "--weights-dir", str(tmp_path / "empty"), "--workers", "2",
             "--port", "0", "--missing-weights", "fetch", "--weights-base-url", base_url],
            capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
        )  # fmt: skip
    finally:
        mirror.shutdown()
        mirror.server_close()
    # The supervisor fetched once, found it corrupt, and stopped before any worker started.
    assert gets == ["/resnet18-f37072fd.pth"], gets
    assert result.returncode == 1
    assert "could not fetch the weights of resnet18v1" in result.stderr
    assert "Traceback" not in result.stderr


class Stub:
    """`python -m tests.integration.stubs ...`, its output lines gathered as they come."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.stubs", *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.workers: list[int] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(text in line for line in self.seen) < count:
            try:
                self.seen.append(self.lines.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"{count} x {text!r} not seen within {timeout_s} s:\n{self.log()}") from None

    def note_workers(self) -> None:
        for child in psutil.Process(self.process.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if any("spawn_main" in part for part in child.cmdline()):
                    self.workers.append(child.pid)

    def wait(self, timeout_s: float) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=10)  # the rest of the output, up to EOF
        with contextlib.suppress(queue.Empty):
            while True:
                self.seen.append(self.lines.get_nowait())
        return code

    def close(self) -> None:
        """Whatever the test's outcome: nothing left running (these workers ignore SIGTERM)."""
        for pid in [self.process.pid, *self.workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        self._reader.join(timeout=10)
        assert self.process.stdout is not None
        self.process.stdout.close()

    def log(self) -> str:
        return "\n".join(self.seen)


def test_workers_that_all_hang_are_killed_after_the_grace_period():
    """Every worker stuck (one hung GPU stalls them all): no worker ever exits by itself, and yet the
    kill deadline holds."""
    stub = Stub("hung-workers", "0.2")
    try:
        stub.wait_for("ready", 2)
        stub.note_workers()
        stub.process.send_signal(signal.SIGTERM)
        code = stub.wait(timeout_s=30)
    finally:
        stub.close()
    assert code == 1, stub.log()
    assert len(stub.workers) == 2, stub.log()
    for pid in stub.workers:
        assert f"(pid {pid}) did not stop in time: killing it" in stub.log()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_each_signal_reaches_the_workers_as_it_was_received(sig):
    """A second Ctrl-C must reach the workers as SIGINT too: uvicorn's force-quit."""
    stub = Stub("signal-workers", "30")
    try:
        stub.wait_for("ready", 2)
        stub.process.send_signal(sig)
        stub.wait_for(f"got {sig.name}", 2)
        stub.process.send_signal(sig)
        stub.wait_for(f"got {sig.name}", 4)
        code = stub.wait(timeout_s=30)
    finally:
        stub.close()
    assert code == 0, stub.log()
    other = signal.SIGTERM if sig == signal.SIGINT else signal.SIGINT
    assert f"got {other.name}" not in stub.log()
