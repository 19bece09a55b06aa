"""Several server processes behind one listening socket (`serve --workers N`).

On a many-core GPU host one Python process runs out of CPU for HTTP, multipart parsing and JPEG
decoding long before the GPU runs out of work. N workers, each a whole server (its own model copy,
batcher and decode pool), accept from the same socket, and the kernel spreads connections among them.

The supervisor binds the socket, points prometheus-client's multiprocess mode at a fresh directory,
starts the workers (spawned, never forked: CUDA cannot survive a fork), passes on every SIGTERM and
SIGINT it receives, as it received it (a second Ctrl-C force-quits the workers, as it does uvicorn),
and waits. A worker that dies while the server is not stopping is a failure: the others are drained
too and the supervisor exits 1, so that the container's restart policy starts afresh rather than
serving on with less capacity than configured. A worker still running `KILL_AFTER_GRACE_S` after
the grace period (a hung GPU stalls every worker at once) is killed, and the supervisor exits 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess

from service.config import Settings
from service.metrics import MULTIPROCESS_DIR_ENV

logger = logging.getLogger(__name__)

# A worker gets the settings, the shared socket and a call that returns once every worker has
# loaded its models: no worker accepts before all are ready, so /ping's Healthy holds for all of them.
Worker = Callable[[Settings, socket.socket, Callable[[], None]], int]

_PR_SET_PDEATHSIG = 1
# Longer than a worker's own margin (server.HUNG_EXIT_MARGIN_S): a worker that can still run Python
# exits by itself with its reason; this kill is for one that cannot (stopped, stuck in native code).
KILL_AFTER_GRACE_S = 10.0


def run_workers(settings: Settings, worker: Worker) -> int:
    """Run `settings.workers` copies of `worker` on one socket; 0 after a clean drain of all of them."""
    listener = _listen(settings.host, settings.port)
    metrics_dir, made_here = _metrics_dir()
    context = multiprocessing.get_context("spawn")
    all_loaded = context.Barrier(settings.workers)
    workers = [
        context.Process(
            target=_worker_main, args=(worker, settings, listener, all_loaded), name=f"resnet-serve-worker-{index}"
        )
        for index in range(settings.workers)
    ]
    stopping = False
    # A worker that outlives its own grace period (a forward that never returns) is killed.
    kill_at = math.inf
    # The wait below sleeps until a worker exits; a signal writes here to wake it, so that the kill
    # deadline it sets is kept even when no worker ever exits.
    wake_reader, wake_writer = socket.socketpair()
    wake_writer.setblocking(False)

    def stop_all(reason: str, sig: signal.Signals = signal.SIGTERM) -> None:
        nonlocal stopping, kill_at
        if not stopping:
            logger.info("%s: draining %d workers", reason, len(workers))
            kill_at = time.monotonic() + settings.shutdown_grace_s + KILL_AFTER_GRACE_S
        stopping = True
        for process in workers:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, sig)
        with contextlib.suppress(BlockingIOError):
            wake_writer.send(b"\0")

    def on_signal(sig: int, _frame: FrameType | None) -> None:
        received = signal.Signals(sig)
        stop_all(f"signal {received.name}", received)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    failed = False
    try:
        for process in workers:
            process.start()
        host, port = listener.getsockname()[:2]
        logger.info("listening on http://%s:%d with %d worker processes", host, port, len(workers))
        running = {process.sentinel: process for process in workers}
        while running:
            timeout = None if math.isinf(kill_at) else max(0.0, kill_at - time.monotonic())
            ready = multiprocessing.connection.wait([*running, wake_reader], timeout=timeout)
            if wake_reader in ready:
                wake_reader.recv(4096)
            exited = [sentinel for sentinel in ready if sentinel is not wake_reader]
            if not exited and time.monotonic() >= kill_at:
                failed = True
                for process in running.values():
                    logger.error("worker %s (pid %s) did not stop in time: killing it", process.name, process.pid)
                    process.kill()
                kill_at = math.inf
                continue
            for sentinel in exited:
                assert isinstance(sentinel, int)
                process = running.pop(sentinel)
                process.join()
                multiprocess.mark_process_dead(process.pid, metrics_dir)  # type: ignore[no-untyped-call]
                # Killed by the signal we passed on is clean too: before a worker's handlers are in place
                # it has not accepted anything (the server installs its draining handler before it accepts).
                stopped_as_asked = stopping and process.exitcode in (0, -signal.SIGTERM, -signal.SIGINT)
                if not stopped_as_asked:
                    failed = True
                    logger.error("worker %s (pid %s) exited with code %s", process.name, process.pid, process.exitcode)
                    stop_all("a worker exited")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        wake_reader.close()
        wake_writer.close()
        listener.close()
        if made_here:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 1 if failed else 0


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, backlog=2048)
    listener.set_inheritable(True)
    return listener


def _metrics_dir() -> tuple[str, bool]:
    """The multiprocess directory: the operator's (emptied, as prometheus-client requires) or a new one."""
    given = os.environ.get(MULTIPROCESS_DIR_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        return given, False
    made = tempfile.mkdtemp(prefix="resnet-serve-metrics-")
    # Inherited by the workers when they are spawned; prometheus-client reads it at import.
    os.environ[MULTIPROCESS_DIR_ENV] = made
    return made, True


def _worker_main(worker: Worker, settings: Settings, listener: socket.socket, all_loaded: threading.Barrier) -> None:
    # Own process group: a terminal's Ctrl-C reaches only the supervisor, which passes it on; else
    # each worker would get it twice, and uvicorn takes a second signal as "quit without draining".
    os.setpgid(0, 0)
    # Stopped while still loading: nothing was admitted, so leaving at once is a clean exit. The
    # server replaces these handlers with its draining ones when it starts.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    if sys.platform == "linux":
        # Die with the supervisor, even if it is killed with SIGKILL.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    def wait_for_all_workers() -> None:
        all_loaded.wait()

    sys.exit(worker(settings, listener, wait_for_all_workers))


def _exit_cleanly(_sig: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)
