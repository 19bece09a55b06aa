"""The server runtime: uvicorn's configuration, the draining server, signals, and the worker entry.

service/cli.py parses the command line and calls `serve`; with `--workers N` the supervisor
(service/supervisor.py) runs `serve_in_worker` in each worker process.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

import uvicorn

from service import cores, memory
from service.config import ServerPlan, Settings
from service.engine import Engine

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.api.app import ModelLoader
    from service.models.weights import VerifiedWeights

logger = logging.getLogger("service")

# After SIGTERM, a process whose work is still running this long past `--shutdown-grace-s` (a
# forward that never returns, a thread that never ends) exits by itself: never serving again, it
# would only keep the orchestrator waiting for its SIGKILL. Under the supervisor, which kills a
# worker later (supervisor.KILL_AFTER_GRACE_S), the worker's own one-line reason comes first.
HUNG_EXIT_MARGIN_S = 5.0
EXIT_HUNG = 1


def configure_logging(level: str, *, worker: bool = False) -> None:
    # With several workers, each line says which process wrote it.
    process = " [%(process)d]" if worker else ""
    logging.basicConfig(
        level=level.upper(), format=f"%(asctime)s %(levelname)s{process} %(name)s: %(message)s", stream=sys.stderr
    )


def serve(settings: Settings) -> int:
    """`resnet-serve serve` once its settings are valid: one server, or the supervisor and its workers."""
    if settings.workers > 1:
        from service.errors import StartupError
        from service.models.registry import resolve_weights
        from service.supervisor import run_workers

        try:
            # Once, here: N workers must not make N downloads, nor serve different random weights.
            verified = resolve_weights(settings)
        except StartupError as exc:
            print(f"resnet-serve: startup failed: {exc}", file=sys.stderr)
            return 1
        try:
            return run_workers(settings, functools.partial(serve_in_worker, verified=verified))
        except OSError as exc:  # the port is taken, or the address is not this host's
            print(f"resnet-serve: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
            return 1
    return run_server(settings)


def serve_in_worker(
    settings: Settings,
    listener: socket.socket,
    wait_for_all_workers: Callable[[], None],
    *,
    verified: Mapping[str, VerifiedWeights] | None = None,
) -> int:
    """One of several workers (see service/supervisor.py): models load before it accepts, so that a
    worker still loading never takes a connection from the shared socket. `verified`: the weights the
    supervisor obtained and hashed; the worker loads exactly those bytes, or refuses to start."""
    from service.errors import StartupError
    from service.models.registry import load_all
    from service.models.runner import pick_device

    configure_logging(settings.log_level, worker=True)
    memory.limit_arenas()
    device = pick_device(settings.device)
    try:
        loaded = load_all(settings.resolve(on_gpu=device.type == "cuda"), device, verified)
    except StartupError as exc:
        logger.error("startup failed: %s", exc)
        print(f"resnet-serve: startup failed: {exc}", file=sys.stderr)
        return 1
    wait_for_all_workers()
    return run_server(settings, listener=listener, load_models=lambda _plan, _device: loaded)


def run_server(
    settings: Settings, *, listener: socket.socket | None = None, load_models: ModelLoader | None = None
) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean drain, 1 when startup failed."""
    from service.api.app import create_app
    from service.models.registry import load_all
    from service.models.runner import pick_device

    memory.limit_arenas()
    plan = settings.resolve(on_gpu=pick_device(settings.device).type == "cuda")
    logger.info(
        "threads: %d torch, %d decode (%d usable CPUs, %d worker processes)",
        plan.torch_threads,
        plan.decode_workers,
        cores.usable_cpus(),
        plan.workers,
    )
    failure: list[str] = []
    server: DrainingServer | None = None

    def stop_on_failure(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    # Alone, the server answers /health/live (and /ping 503) while it loads.
    app = create_app(
        settings,
        load_models=load_models or load_all,
        background_load=load_models is None,
        on_startup_failure=stop_on_failure,
    )
    # uvicorn re-raises a captured SIGTERM/SIGINT with the handler it found, after its graceful
    # shutdown; a handler that only records makes a completed drain exit 0 instead of dying by the
    # signal, and keeps one that arrives before uvicorn listens for signals from being lost.
    early_signals: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda sig, _frame: early_signals.append(sig))
    server = DrainingServer(uvicorn_config(app, plan), app.state.server, early_signals)
    server.run(sockets=[listener] if listener is not None else None)
    if failure:
        print(f"resnet-serve: startup failed: {failure[0]}", file=sys.stderr)
        return 1
    return 0


def uvicorn_config(app: FastAPI, plan: ServerPlan) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=plan.host,
        port=plan.port,
        http=_http_protocol(plan),
        h11_max_incomplete_event_size=plan.max_header_bytes,
        limit_concurrency=plan.max_connections or None,
        access_log=plan.access_log,
        log_level=plan.log_level,
        # Annotated int, but uvicorn only hands it to asyncio.wait_for: a fraction is kept, and 0 cancels
        # the requests at once (None, what `int(0.5) or None` made of it, would wait for ever).
        timeout_graceful_shutdown=cast("int", plan.shutdown_grace_s),
        log_config=None,
    )


def _http_protocol(plan: ServerPlan) -> Any:
    """httptools (fast) with our head-size cap and head timeout when installed, else h11 with its own cap."""
    try:
        from service.api.protocol import bounded_protocol
    except ImportError:
        return "h11"
    return bounded_protocol(plan.max_header_bytes, plan.head_timeout_s)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that turns readiness to 503 and stops admission the moment SIGTERM arrives;
    uvicorn then stops accepting, lets in-flight requests finish within the grace period, and
    the lifespan drains the batchers. A second signal is uvicorn's force-quit."""

    def __init__(self, config: uvicorn.Config, engine: Engine, early_signals: list[int]) -> None:
        super().__init__(config)
        self._engine = engine
        self._early_signals = early_signals
        self._watchdog: threading.Timer | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self._early_signals:  # stopped before uvicorn caught signals: drain now, as if caught
            self.handle_exit(self._early_signals[0], None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            grace = self._engine.plan.shutdown_grace_s
            logger.info("signal %s: draining (grace %ss)", sig, grace)
            self._engine.begin_drain()
            if self._watchdog is None:
                self._watchdog = _exit_if_still_running_after(grace + HUNG_EXIT_MARGIN_S, grace)
        super().handle_exit(sig, frame)


def _exit_if_still_running_after(delay_s: float, grace_s: float) -> threading.Timer:
    def give_up() -> None:
        logger.error(
            "killed: work was still running %gs after the shutdown grace of %gs (a hung forward?)",
            HUNG_EXIT_MARGIN_S,
            grace_s,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        # os._exit: a normal exit would join the very thread that hangs.
        os._exit(EXIT_HUNG)

    timer = threading.Timer(delay_s, give_up)
    timer.daemon = True  # a clean exit does not wait for it
    timer.start()
    return timer
