"""Processes that misbehave on purpose, for the shutdown tests: `python -m tests.integration.stubs MODE`.

- `hung-workers GRACE`: the supervisor over two workers that ignore every signal and never return.
- `signal-workers GRACE`: the supervisor over two workers that print each signal they receive and
  return after the second.
- `hung-forward WEIGHTS_DIR PORT GRACE`: one server whose model's forward never returns.

Each prints `ready` (per worker) once it waits for signals. The supervisor's workers are spawned, so
they must be importable functions of a module that imports little: this one.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Short, so that the tests do not wait the production margins.
KILL_AFTER_GRACE_S = 1.0
HUNG_EXIT_MARGIN_S = 3.0


def _say(line: str) -> None:
    # One write per line: the workers share the pipe, and print() may split a line in two writes.
    os.write(1, f"{line}\n".encode())


def hang(_settings: Any, _listener: socket.socket, wait_for_all_workers: Callable[[], None]) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    wait_for_all_workers()
    _say("ready")
    while True:
        time.sleep(3600)


def report_signals(_settings: Any, _listener: socket.socket, wait_for_all_workers: Callable[[], None]) -> int:
    # Blocked, then taken with sigwait: none can slip between two waits.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    wait_for_all_workers()
    _say("ready")
    for _ in range(2):
        received = signal.sigwait({signal.SIGTERM, signal.SIGINT})
        _say(f"worker {os.getpid()} got {signal.Signals(received).name}")
    return 0


def _run_workers(worker: Callable[..., int], grace_s: float) -> int:
    from service import supervisor
    from service.config import Settings

    supervisor.KILL_AFTER_GRACE_S = KILL_AFTER_GRACE_S
    settings = Settings(workers=2, port=0, shutdown_grace_s=grace_s)
    return supervisor.run_workers(settings, worker)


def _serve_with_a_hung_forward(weights_dir: Path, port: int, grace_s: float) -> int:
    import torch

    from service import server
    from service.config import ServerPlan, Settings
    from service.models.registry import LoadedModel, load_all

    server.HUNG_EXIT_MARGIN_S = HUNG_EXIT_MARGIN_S

    def never_returns(_images: torch.Tensor) -> Any:
        _say("forward entered")
        threading.Event().wait()
        raise AssertionError("unreachable")

    def load(plan: ServerPlan, device: torch.device) -> dict[str, LoadedModel]:
        loaded = load_all(plan, device)  # warmed up with the real forward
        for model in loaded.values():
            model.runner.runtime.outputs = never_returns  # type: ignore[method-assign]
        return loaded

    settings = Settings(weights_dir=weights_dir, port=port, device="cpu", shutdown_grace_s=grace_s, max_delay_ms=0)
    server.configure_logging("info")
    return server.run_server(settings, load_models=load)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    mode, *args = argv
    if mode == "hung-workers":
        from tests.integration.stubs import hang

        return _run_workers(hang, float(args[0]))
    if mode == "signal-workers":
        from tests.integration.stubs import report_signals

        return _run_workers(report_signals, float(args[0]))
    if mode == "hung-forward":
        return _serve_with_a_hung_forward(Path(args[0]), int(args[1]), float(args[2]))
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
