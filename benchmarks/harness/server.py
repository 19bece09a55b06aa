"""A resnet-serve process on a free loopback port: random weights for it, start, wait for /ping,
its log, its resource use (psutil, over the process tree where it matters), its metrics, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.harness.metrics import Metrics, scrape

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def write_weights(model: str, directory: Path, seed: int = 0) -> None:
    """Seeded random-init weights for `model` in `directory`, by the server's own command."""
    command = [sys.executable, "-m", "service", "weights", "random", model, "--seed", str(seed),
               "--dir", str(directory)]  # fmt: skip
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def wait_ready(
    url: str,
    path: str = "/ping",
    timeout_s: float = 120.0,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
    interval_s: float = 0.1,
) -> None:
    """Poll `url + path` until it answers 200. With `process`, give up at once when it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}{_tail(log_path)}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + path, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(interval_s)
    raise TimeoutError(f"{url}{path} did not answer 200 within {timeout_s:.0f} s{_tail(log_path)}")


def _read(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail(log_path: Path | None) -> str:
    """The server's log, for an error message (nothing when it logs to the terminal)."""
    return f":\n{_read(log_path)}" if log_path is not None else ""


@dataclass(frozen=True)
class ProcessStats:
    rss_bytes: int
    open_fds: int
    threads: int
    cpu_s: float  # user + system


def process_stats(pid: int, *, tree: bool = False) -> ProcessStats:
    """Resource use of `pid`, or with `tree` summed over it and its live descendants (with
    `--workers` the server is a supervisor and its worker processes)."""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)] if tree else [root]
    rss = fds = threads = 0
    cpu = 0.0
    for process in processes:
        try:
            with process.oneshot():
                times = process.cpu_times()
                rss += process.memory_info().rss
                fds += process.num_fds()
                threads += process.num_threads()
                cpu += times.user + times.system
        except psutil.NoSuchProcess:  # a child that ended meanwhile
            if process is root:
                raise
    return ProcessStats(rss, fds, threads, cpu)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its live descendants; 0 when it is gone."""
    try:
        return process_stats(pid, tree=True).cpu_s
    except psutil.Error:
        return 0.0


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path | None
    started_at: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return _read(self.log_path)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        wait_ready(self.url, "/ping", timeout_s, process=self.process, log_path=self.log_path)

    def stats(self, *, tree: bool = False) -> ProcessStats:
        return process_stats(self.pid, tree=tree)

    def rss_bytes(self) -> int:
        return self.stats().rss_bytes

    def open_fds(self) -> int:
        return self.stats().open_fds

    def threads(self) -> int:
        return self.stats().threads

    def metrics(self) -> Metrics:
        metrics = scrape(f"{self.url}/metrics")
        if metrics is None:
            raise RuntimeError(f"no metrics at {self.url}/metrics")
        return metrics

    def metric(self, name: str, /, **labels: str) -> float:
        """One sample's value from /metrics (0 when absent)."""
        return self.metrics().value(name, labels)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        """Send `sig` (unless it already exited) and wait; kill it past `timeout_s`. The exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def spawn(
    weights_dir: Path,
    log_path: Path | None,
    *flags: str,
    model: str = "resnet18v1",
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> ServerProcess:
    """Start `python -m service serve` on a loopback port without waiting for readiness; its output
    goes to `log_path` (None: this process's own stdout and stderr)."""
    port = free_port() if port is None else port
    command = [
        sys.executable, "-m", "service", "serve", "--models", model, "--weights-dir", str(weights_dir),
        "--host", HOST, "--port", str(port), *flags,
    ]  # fmt: skip
    full_env = {**os.environ, **(env or {})}
    if log_path is None:
        process = subprocess.Popen(command, cwd=REPO, env=full_env)
    else:
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    return ServerProcess(process, port, log_path)


@contextlib.contextmanager
def serving(
    weights_dir: Path,
    log_path: Path | None,
    *flags: str,
    model: str = "resnet18v1",
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 60.0,
    stop_timeout_s: float = 30.0,
) -> Iterator[ServerProcess]:
    """A started and ready server, stopped with SIGTERM (then SIGKILL past `stop_timeout_s`) on exit."""
    server = spawn(weights_dir, log_path, *flags, model=model, env=env)
    try:
        server.wait_ready(ready_timeout_s)
        yield server
    finally:
        server.stop(timeout_s=stop_timeout_s)
