"""The FastAPI application: `create_app(settings)` builds a fresh one, with nothing global."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import torch
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from service import __version__
from service.api import admin, demo, embed, handlers, predict, v2
from service.api.uploads import UploadLimits
from service.config import ServerPlan, Settings
from service.engine import Engine
from service.errors import StartupError
from service.metrics import CudaMemoryCollector, Metrics
from service.models.registry import LoadedModel, load_all
from service.models.runner import pick_device

logger = logging.getLogger(__name__)

ModelLoader = Callable[[ServerPlan, torch.device], dict[str, LoadedModel]]


def create_app(
    settings: Settings,
    *,
    load_models: ModelLoader = load_all,
    background_load: bool = False,
    on_startup_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """Build the app. Models load in the lifespan: before it yields (tests), or behind it
    (`background_load`, the CLI) so that /health/live answers and /ping says Unhealthy meanwhile."""
    device = pick_device(settings.device)
    resolved = settings.resolve(on_gpu=device.type == "cuda")
    torch.set_num_threads(resolved.torch_threads)
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_batch_size=resolved.max_batch_size)
    if device.type == "cuda":
        metrics.add_host_collector(CudaMemoryCollector(range(torch.cuda.device_count())))
    engine = Engine(resolved, metrics, device)

    async def load() -> None:
        try:
            loaded = await asyncio.to_thread(load_models, resolved, device)
        except Exception as exc:
            # One line for the operator; a StartupError's message is already written for them.
            message = str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"
            # A StartupError is a known problem, said in one line; anything else gets its traceback.
            logger.error("startup failed: %s", message, exc_info=not isinstance(exc, StartupError))
            engine.mark_failed(f"startup failed: {message}")
            if on_startup_failure is not None:
                on_startup_failure(message)
            if not background_load:
                raise
            return
        for model in loaded.values():
            engine.add_model(model)
        engine.mark_ready()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading: asyncio.Task[None] | None = None
        if background_load:
            loading = asyncio.create_task(load())
        else:
            await load()
        try:
            yield
        finally:
            if loading is not None and not loading.done():
                loading.cancel()
            await engine.close()

    app = FastAPI(
        title="resnet-serve",
        version=__version__,
        description="Image classification with torchvision ResNets, batched. Errors are "
        '`{"code": int, "type": str, "message": str}`; under `/v2` (the Open Inference Protocol) '
        '`{"error": str}`.',
        lifespan=lifespan,
    )
    app.state.server = engine
    app.state.upload_limits = UploadLimits(
        max_bytes=resolved.max_upload_bytes, max_images=resolved.max_images_per_request
    )
    handlers.install(app)
    app.include_router(admin.router)
    app.include_router(predict.router)
    app.include_router(embed.router)
    app.include_router(v2.router)
    app.include_router(demo.router)
    app.mount(demo.STATIC_PATH, demo.static_files(), name="static")
    return app
