"""Ray Serve adapter (the `resnet-serve[ray]` extra): the same FastAPI app, one copy per replica.

Each replica builds `create_app(Settings(...))` through `serve.ingress`, and Ray runs the app's
lifespan: the models load and warm up before the replica counts as started, and at shutdown the
engine drains what Ray's own drain left. Ray Serve's autoscaler aims at `target_ongoing_requests`
= T, the same number as the Kubernetes manifests' (deploy/k8s/overlays/cpu/scaling-target.yaml).

    serve run service.ray_serve:app                         # defaults; the app's settings from RESNET_SERVE_*
    serve run service.ray_serve:build min_replicas=1 max_replicas=4 metrics_port=9101

Metrics: each replica serves its own registry (the same names as the plain server) on
`metrics_port` for Prometheus to scrape as the job `resnet-serve`, so the Grafana dashboard works
unchanged; `/metrics` through Ray's proxy would reach one replica at random. Ray's own metrics
(`ray_serve_*`) come from each node's metrics agent as usual. See docs/scale-out.md.

No `from __future__ import annotations` here: Ray reads the builder's parameter annotation as a
class to validate `serve run` arguments with it.
"""

import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from prometheus_client import start_http_server
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment

from service.api.app import create_app
from service.config import Settings
from service.engine import Engine, Phase

logger = logging.getLogger(__name__)

# T, "target in-flight requests per replica", on a 2-CPU replica: docs/scale-out.md ("The number T")
# says how it was chosen. The manifests hold the same number (tests/integration/test_ray_serve.py
# checks that they agree).
TARGET_ONGOING_REQUESTS: Final = 4
# Ray's cap per replica; beyond it requests wait in Ray's proxy. 16 clients fill the server's
# batches on 2 CPUs (docs/benchmarks.md).
MAX_ONGOING_REQUESTS: Final = 16
# Ray kills a replica this long after the server's own grace: the engine's drain runs inside it.
DRAIN_MARGIN_S: Final = 5.0
DEPLOYMENT_NAME: Final = "ResnetServe"
# Set in the replicas' environment (runtime_env) when the app comes from `service.ray_serve:app`, which
# takes no arguments: each replica's metrics port, and the address a file_sd target names. Not
# RESNET_SERVE_*: those are the app's settings, which refuse names they do not know.
METRICS_PORT_ENV: Final = "RESNET_RAY_METRICS_PORT"
METRICS_HOST_ENV: Final = "RESNET_RAY_METRICS_HOST"


class ReplicaOptions(BaseModel):
    """How Ray runs and scales the replicas: `serve run service.ray_serve:build key=value ...`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Never zero: a replica's start loads, exports and warms up the model (docs/scale-out.md).
    min_replicas: int = Field(default=2, ge=1)
    max_replicas: int = Field(default=10, ge=1)
    target_ongoing_requests: float = Field(default=TARGET_ONGOING_REQUESTS, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=300.0, ge=0)
    # How often replicas report their ongoing requests, and over what window the autoscaler averages.
    metrics_interval_s: float = Field(default=10.0, gt=0)
    look_back_period_s: float = Field(default=30.0, gt=0)
    num_cpus: float = Field(default=2.0, gt=0)
    # 1 puts one replica on each GPU (and RESNET_SERVE_DEVICE should say cuda); 0 on CPU nodes.
    num_gpus: float | None = Field(default=None, ge=0)
    # Each replica's Prometheus endpoint; 0: a free port (several replicas a node); None: the port in
    # RESNET_RAY_METRICS_PORT, or no endpoint without it.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # A folder in which each replica keeps a Prometheus file_sd target file while it runs.
    metrics_sd_dir: str | None = None
    # The app's settings, over the RESNET_SERVE_* environment of the replica.
    settings: dict[str, Any] = Field(default_factory=dict)


def gpus_for(options: ReplicaOptions, settings: Settings) -> float:
    """One GPU per replica when the app is told to use CUDA; `auto` cannot know the node, so it asks none."""
    if options.num_gpus is not None:
        return options.num_gpus
    return 1.0 if settings.device.startswith("cuda") else 0.0


def deployment_options(options: ReplicaOptions) -> dict[str, Any]:
    """The keyword arguments of `serve.deployment(...).options(...)` for these options."""
    if options.max_replicas < options.min_replicas:
        raise ValueError(
            f"max_replicas ({options.max_replicas}) is below min_replicas ({options.min_replicas}): raise max_replicas"
        )
    settings = Settings(**options.settings)
    return {
        "autoscaling_config": {
            "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests,
            "upscale_delay_s": options.upscale_delay_s,
            "downscale_delay_s": options.downscale_delay_s,
            "metrics_interval_s": options.metrics_interval_s,
            "look_back_period_s": options.look_back_period_s,
        },
        "max_ongoing_requests": MAX_ONGOING_REQUESTS,
        # The controller stops routing to a replica it removes and waits for its ongoing requests,
        # then the lifespan drains the engine; the kill comes after the server's grace, never inside it.
        "graceful_shutdown_wait_loop_s": 1.0,
        "graceful_shutdown_timeout_s": settings.shutdown_grace_s + DRAIN_MARGIN_S,
        "ray_actor_options": {"num_cpus": options.num_cpus, "num_gpus": gpus_for(options, settings)},
    }


class Replica:
    """One replica: the whole app (batcher, metrics, drain) in this actor's event loop."""

    def __init__(self, options: ReplicaOptions) -> None:
        self._options = options
        self._settings = Settings(**options.settings)
        self._engine: Engine | None = None
        self._metrics_server: Any = None
        self._sd_file: Path | None = None

    def __serve_build_asgi_app__(self) -> Callable[..., Awaitable[None]]:
        # Ray runs the app's lifespan after this returns and before the replica takes requests.
        app = create_app(self._settings)
        self._engine = app.state.server
        port = self._options.metrics_port
        if port is None and os.environ.get(METRICS_PORT_ENV):
            port = int(os.environ[METRICS_PORT_ENV])
        if port is not None:
            self._serve_metrics(port)
        return app

    def _built_engine(self) -> Engine:
        assert self._engine is not None, "Ray builds the app before it calls the replica"
        return self._engine

    def _serve_metrics(self, port: int) -> None:
        registry = self._built_engine().metrics.registry
        server, _ = start_http_server(port, addr="0.0.0.0", registry=registry)
        self._metrics_server = server
        bound = int(server.server_address[1])
        logger.info("metrics on port %d", bound)
        if self._options.metrics_sd_dir is not None:
            self._sd_file = write_sd_target(Path(self._options.metrics_sd_dir), bound)

    def check_health(self) -> None:
        """Ray restarts a replica whose check raises: a failed start or a dead engine."""
        engine = self._built_engine()
        if engine.phase is Phase.FAILED:
            raise RuntimeError(engine.failure or "the engine failed")

    def __del__(self) -> None:
        # Ray calls this after the app's lifespan shutdown (the drain).
        if self._metrics_server is not None:
            threading.Thread(target=self._metrics_server.shutdown, daemon=True).start()
        if self._sd_file is not None:
            self._sd_file.unlink(missing_ok=True)


# Ray's decorators, applied as calls so that the deployment keeps its type for the checker.
ResnetServe: Deployment = serve.deployment(name=DEPLOYMENT_NAME)(serve.ingress()(Replica))


def write_sd_target(directory: Path, port: int) -> Path:
    """A Prometheus file_sd file naming this replica's metrics endpoint, written atomically."""
    context = serve.get_replica_context()
    replica = context.replica_id.unique_id
    host = os.environ.get(METRICS_HOST_ENV, "127.0.0.1")
    labels = {"replica": replica, "deployment": context.deployment}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{replica}.json"
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps([{"targets": [f"{host}:{port}"], "labels": labels}]))
    partial.replace(path)
    return path


def build(options: ReplicaOptions) -> Application:
    """The application builder of `serve run service.ray_serve:build key=value ...`."""
    return ResnetServe.options(**deployment_options(options)).bind(options)


app = build(ReplicaOptions())
