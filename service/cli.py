"""The `resnet-serve` command: `serve`, and `weights random|fetch|list`."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import ValidationError

from service import memory
from service.engine import Engine

if TYPE_CHECKING:
    from service.api.app import ModelLoader
from service.config import Settings

logger = logging.getLogger("service")

# (flag, settings field, type, help); each is also RESNET_SERVE_<FIELD> in the environment.
SERVE_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--models", "models", str, "comma-separated model names (default resnet18v1)"),
    ("--weights-dir", "weights_dir", Path, "directory holding the weights files (default weights/)"),
    ("--missing-weights", "missing_weights", str,
     "when a model has no weights file: fail (default), fetch, random, fetch-or-random"),
    ("--random-seed", "random_seed", int, "seed for generated random-init weights (default 0)"),
    ("--weights-base-url", "weights_base_url", str,
     "where --missing-weights fetch downloads from (default download.pytorch.org/models/; or a mirror)"),
    ("--host", "host", str, "address to bind (default 127.0.0.1)"),
    ("--port", "port", int, "port to bind (default 8080)"),
    ("--workers", "workers", int,
     "server processes on the port, each with its own model copy (default 1; more on big GPU hosts)"),
    ("--device", "device", str, "auto (CUDA when available), cpu, cuda or cuda:N"),
    ("--max-batch-size", "max_batch_size", int, "images per forward at most (default 8 on CPU, 64 on GPU)"),
    ("--max-delay-ms", "max_delay_ms", float, "how long a batch waits to fill (default 2 on CPU, 5 on GPU)"),
    ("--batch-buckets", "batch_buckets", str,
     "sizes batches are padded to, e.g. 1,2,4,8, or off (default: powers of 2 on GPU, off on CPU)"),
    ("--max-batches-in-flight", "max_batches_in_flight", int,
     "batches handed to the device at once; 2 overlaps copy and compute (default 2 on GPU, 1 on CPU)"),
    ("--max-queue-size", "max_queue_size", int, "admitted images waiting per model (default 8 x batch)"),
    ("--request-timeout-s", "request_timeout_s", float, "deadline of a request from arrival (default 30)"),
    ("--upload-timeout-s", "upload_timeout_s", float, "time for a body to arrive; then 408 (default 10)"),
    ("--max-upload-bytes", "max_upload_bytes", int, "body size cap (default 10 MiB)"),
    ("--max-header-bytes", "max_header_bytes", int, "request line + headers cap; then 431 (default 64 KiB)"),
    ("--max-image-pixels", "max_image_pixels", int, "pixel cap, checked before decoding (default 50M)"),
    ("--max-images-per-request", "max_images_per_request", int, "data parts in one request (default 64)"),
    ("--shutdown-grace-s", "shutdown_grace_s", float, "time to finish accepted work on SIGTERM (default 30)"),
    ("--decode-workers", "decode_workers", int, "threads decoding images (default: by device)"),
    ("--torch-threads", "torch_threads", int, "intra-op threads of the forward (default: by device)"),
    ("--dtype", "dtype", str, "float32 (default), float16 or bfloat16 (autocast; GPU)"),
    ("--log-level", "log_level", str, "debug, info (default), warning, error"),
]  # fmt: skip

# On/off settings: `--flag` / `--no-flag`, and RESNET_SERVE_<FIELD>=true|false.
SERVE_SWITCHES: list[tuple[str, str, str]] = [
    ("--access-log", "access_log", "log each request (default off)"),
    ("--channels-last", "channels_last", "channels_last memory format (default on)"),
    ("--cuda-graphs", "cuda_graphs", "capture one CUDA graph per batch bucket at startup (default: on with CUDA)"),
    ("--compile", "compile", "torch.compile the model, one shape per bucket, at startup (default off)"),
    ("--decode-on-device", "decode_on_device",
     "decode JPEGs in batches on the GPU (nvJPEG) instead of on CPU threads (default off)"),
]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    result: int = handler(args)
    return result


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-serve", description=__doc__)
    commands = parser.add_subparsers(title="commands")

    serve = commands.add_parser("serve", help="run the HTTP server")
    for flag, _field, type_, help_ in SERVE_FLAGS:
        serve.add_argument(flag, type=type_, default=None, help=help_)
    for flag, _field, help_ in SERVE_SWITCHES:
        serve.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
    serve.set_defaults(handler=_serve)

    weights = commands.add_parser("weights", help="manage weights files").add_subparsers(title="weights commands")
    random_ = weights.add_parser("random", help="write seeded random-init checkpoints (tests, benchmarks)")
    random_.add_argument("names", nargs="+")
    random_.add_argument("--seed", type=int, default=0)
    random_.add_argument("--dir", type=Path, default=Path("weights"))
    random_.set_defaults(handler=_weights_random)

    fetch = weights.add_parser("fetch", help="download official torchvision checkpoints (hash-checked)")
    fetch.add_argument("names", nargs="+")
    fetch.add_argument("--dir", type=Path, default=Path("weights"))
    fetch.add_argument("--base-url", default=None, help="a mirror of download.pytorch.org/models/")
    fetch.set_defaults(handler=_weights_fetch)

    ensure = weights.add_parser(
        "ensure",
        help="make sure each model has a weights file: keep it, else fetch, else random (per --missing-weights)",
        description="Reads the serve settings (RESNET_SERVE_* environment) for the models, directory, seed and "
        "mirror; what is given here wins. Used by docker-compose's weights-init service.",
    )
    ensure.add_argument("names", nargs="*", help="models (default: RESNET_SERVE_MODELS or resnet18v1)")
    ensure.add_argument("--dir", type=Path, default=None)
    ensure.add_argument(
        "--missing-weights", default=None, help="fetch, random or fetch-or-random (default: fetch-or-random)"
    )
    ensure.set_defaults(handler=_weights_ensure)

    list_ = weights.add_parser("list", help="what weights are present, verified or not")
    list_.add_argument("--dir", type=Path, default=Path("weights"))
    list_.add_argument("--verify", action="store_true", help="hash every file (slow for big models)")
    list_.set_defaults(handler=_weights_list)
    return parser


def _configure_logging(level: str, *, worker: bool = False) -> None:
    # With several workers, each line says which process wrote it.
    process = " [%(process)d]" if worker else ""
    logging.basicConfig(
        level=level.upper(), format=f"%(asctime)s %(levelname)s{process} %(name)s: %(message)s", stream=sys.stderr
    )


def _serve(args: argparse.Namespace) -> int:
    from service.errors import StartupError
    from service.models.registry import resolve_specs

    flags = [(flag, field) for flag, field, _, _ in SERVE_FLAGS] + [(flag, field) for flag, field, _ in SERVE_SWITCHES]
    overrides = {field: getattr(args, flag.lstrip("-").replace("-", "_")) for flag, field in flags}
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
        resolve_specs(settings.models)
    except ValidationError as exc:
        print(f"resnet-serve: invalid setting: {_validation_summary(exc)}", file=sys.stderr)
        return 2
    except (StartupError, RuntimeError) as exc:
        print(f"resnet-serve: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    try:  # settings that only the device can judge, checked once before any worker starts
        from service.models.runner import pick_device

        settings.resolved(on_gpu=pick_device(settings.device).type == "cuda")
    except (RuntimeError, ValueError) as exc:  # e.g. --device cuda without CUDA, graphs on a CPU
        print(f"resnet-serve: {exc}", file=sys.stderr)
        return 2
    if settings.workers > 1:
        from service.supervisor import run_workers

        try:
            return run_workers(settings, serve_in_worker)
        except OSError as exc:  # the port is taken, or the address is not this host's
            print(f"resnet-serve: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
            return 1
    return _run_server(settings, listener=None)


def serve_in_worker(settings: Settings, listener: socket.socket, wait_for_all_workers: Callable[[], None]) -> int:
    """One of several workers (see service/supervisor.py): models load before it accepts, so that a
    worker still loading never takes a connection from the shared socket."""
    from service.errors import StartupError
    from service.models.registry import load_all
    from service.models.runner import pick_device

    _configure_logging(settings.log_level, worker=True)
    memory.limit_arenas()
    device = pick_device(settings.device)
    try:
        loaded = load_all(settings.resolved(on_gpu=device.type == "cuda"), device)
    except StartupError as exc:
        logger.error("startup failed: %s", exc)
        print(f"resnet-serve: startup failed: {exc}", file=sys.stderr)
        return 1
    wait_for_all_workers()
    return _run_server(settings, listener=listener, load_models=lambda _settings, _device: loaded)


def _run_server(
    settings: Settings, *, listener: socket.socket | None = None, load_models: ModelLoader | None = None
) -> int:
    from service.api.app import create_app
    from service.models.registry import load_all

    memory.limit_arenas()
    failure: list[str] = []
    server: _DrainingServer | None = None

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
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=_http_protocol(settings.max_header_bytes),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        access_log=settings.access_log,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None,
        log_config=None,
    )
    # uvicorn re-raises a captured SIGTERM/SIGINT with the handler it found, after its graceful
    # shutdown; a handler that only records makes a completed drain exit 0 instead of dying by the
    # signal, and keeps one that arrives before uvicorn listens for signals from being lost.
    early_signals: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda sig, _frame: early_signals.append(sig))
    server = _DrainingServer(config, app.state.server, early_signals)
    server.run(sockets=[listener] if listener is not None else None)
    if failure:
        print(f"resnet-serve: startup failed: {failure[0]}", file=sys.stderr)
        return 1
    return 0


def _http_protocol(max_header_bytes: int) -> Any:
    """httptools (fast) with our head-size cap when installed, else h11 with its own cap."""
    try:
        from service.api.protocol import bounded_protocol
    except ImportError:
        return "h11"
    return bounded_protocol(max_header_bytes)


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server that turns readiness to 503 and stops admission the moment SIGTERM arrives;
    uvicorn then stops accepting, lets in-flight requests finish within the grace period, and
    the lifespan drains the batchers."""

    def __init__(self, config: uvicorn.Config, state: Engine, early_signals: list[int]) -> None:
        super().__init__(config)
        self._state = state
        self._early_signals = early_signals

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self._early_signals:  # stopped before uvicorn caught signals: drain now, as if caught
            self.handle_exit(self._early_signals[0], None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            logger.info("signal %s: draining (grace %ss)", sig, self._state.plan.shutdown_grace_s)
            self._state.begin_drain()
        super().handle_exit(sig, frame)


def _weights_random(args: argparse.Namespace) -> int:
    from service.models.weights import write_random

    specs = _specs_or_exit(args.names)
    if specs is None:
        return 2
    for spec in specs:
        path = write_random(spec, args.seed, args.dir)
        print(f"{spec.name}: wrote random-init weights (seed {args.seed}) to {path}")
    return 0


def _weights_fetch(args: argparse.Namespace) -> int:
    from service.models.weights import OFFICIAL_BASE_URL, fetch_official

    specs = _specs_or_exit(args.names)
    if specs is None:
        return 2
    failed = 0
    for spec in specs:
        try:
            path = fetch_official(spec, args.dir, base_url=args.base_url or OFFICIAL_BASE_URL)
        except (OSError, ValueError) as exc:
            print(f"{spec.name}: fetch failed: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{spec.name}: {path} (sha256 verified)")
    return 1 if failed else 0


def _weights_ensure(args: argparse.Namespace) -> int:
    from service.config import MissingWeightsPolicy
    from service.errors import StartupError
    from service.models.registry import obtain_weights, resolve_specs

    overrides: dict[str, Any] = {"missing_weights": args.missing_weights or MissingWeightsPolicy.FETCH_OR_RANDOM}
    if args.names:
        overrides["models"] = tuple(args.names)
    if args.dir is not None:
        overrides["weights_dir"] = args.dir
    _configure_logging("warning")
    try:
        settings = Settings(**overrides)
        for spec in resolve_specs(settings.models):
            weights = obtain_weights(spec, settings)
            print(f"{spec.name}: {weights.path} ({weights.describe()})", flush=True)
    except ValidationError as exc:
        print(f"resnet-serve: invalid setting: {_validation_summary(exc)}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"resnet-serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _weights_list(args: argparse.Namespace) -> int:
    from service.errors import StartupError
    from service.models.catalog import CATALOG
    from service.models.weights import find_weights, verify

    for spec in CATALOG.values():
        found = find_weights(spec, args.dir)
        if found is None:
            print(f"{spec.name:18} missing")
            continue
        status = "present"
        if args.verify:
            try:
                status = f"verified sha256 {verify(found)[:12]}"
            except StartupError as exc:
                status = f"CORRUPT: {exc}"
        print(f"{spec.name:18} {found.path.name:40} {found.describe():32} {status}")
    return 0


def _specs_or_exit(names: Sequence[str]) -> list[Any] | None:
    from service.errors import StartupError
    from service.models.registry import resolve_specs

    try:
        return resolve_specs(tuple(names))
    except StartupError as exc:
        print(f"resnet-serve: {exc}", file=sys.stderr)
        return None


def _validation_summary(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


if __name__ == "__main__":
    raise SystemExit(main())
