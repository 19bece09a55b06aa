"""What the HTTP edge holds while serving: the models with their batchers, pools, phase, metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum

import torch

from service import memory
from service.api.uploads import UploadLimits
from service.batching import MicroBatcher
from service.config import ServerPlan
from service.errors import ModelNotFound, ServiceUnavailable
from service.imaging import ModelInput
from service.metrics import Metrics
from service.models.catalog import find_spec
from service.models.registry import LoadedModel
from service.models.runner import Output

logger = logging.getLogger(__name__)


class Phase(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class ServedModel:
    loaded: LoadedModel
    batcher: MicroBatcher[ModelInput, torch.Tensor]

    @property
    def name(self) -> str:
        return self.loaded.name


class ServerState:
    def __init__(self, settings: ServerPlan, metrics: Metrics, device: torch.device) -> None:
        self.settings = settings
        self.metrics = metrics
        self.device = device
        self.phase = Phase.STARTING
        self.startup_error: str | None = None
        self.models: dict[str, ServedModel] = {}
        self.configured_models = {spec.name for name in settings.models if (spec := find_spec(name)) is not None}
        self.started_at = time.monotonic()
        self._trimmer: asyncio.Task[None] | None = None
        self.upload_limits = UploadLimits(
            max_bytes=settings.max_upload_bytes, max_images=settings.max_images_per_request
        )
        self.decode_pool = ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="decode")
        # One forward at a time per device: concurrent forwards only fight over the same cores.
        self.forward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        # With more than one batch in flight, staging (stack, pin, copy to the device) gets its own
        # thread so it overlaps the forward; with one, a second thread would only add a hand-off.
        self.stage_pool = self.forward_pool
        if settings.max_batches_in_flight > 1:
            self.stage_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")

    def add_model(self, loaded: LoadedModel) -> None:
        runner = loaded.runner
        loop = asyncio.get_running_loop()

        async def forward(images: list[ModelInput]) -> list[Output]:
            if self.stage_pool is self.forward_pool:
                return await loop.run_in_executor(self.forward_pool, runner.predict, images)
            staged = await loop.run_in_executor(self.stage_pool, runner.stage, images)
            return await loop.run_in_executor(self.forward_pool, runner.run, staged)

        batcher: MicroBatcher[ModelInput, torch.Tensor] = MicroBatcher(
            forward,
            max_batch_size=self.settings.max_batch_size,
            max_delay_s=self.settings.max_delay_s,
            max_queue_size=self.settings.max_queue_size,
            observer=self.metrics.observer(loaded.name),
            name=f"batcher-{loaded.name}",
            max_in_flight=self.settings.max_batches_in_flight,
        )
        batcher.start()
        self.models[loaded.name] = ServedModel(loaded, batcher)
        self.metrics.init_model(loaded.name, queue_capacity=self.settings.max_queue_size)
        self.metrics.model_info.labels(
            loaded.name, loaded.spec.arch, str(self.device), self.settings.dtype, loaded.weights.describe()
        ).set(1)

    def mark_ready(self) -> None:
        self._trimmer = asyncio.get_running_loop().create_task(self._give_back_memory_periodically())
        self.phase = Phase.READY
        self.metrics.ready.set(1)
        logger.info("ready: serving %s on %s", ", ".join(self.models), self.device)

    def mark_failed(self, message: str) -> None:
        self.phase = Phase.FAILED
        self.startup_error = message
        self.metrics.ready.set(0)

    def begin_drain(self) -> None:
        """Readiness turns 503 and admission stops at once; admitted work still runs."""
        if self.phase is Phase.DRAINING:
            return
        self.phase = Phase.DRAINING
        self.metrics.ready.set(0)
        for served in self.models.values():
            served.batcher.stop_admitting()

    async def _give_back_memory_periodically(self, interval_s: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            # On the forward thread, so it never runs during a forward.
            await loop.run_in_executor(self.forward_pool, memory.give_back_free_memory)

    async def close(self) -> None:
        if self._trimmer is not None:
            self._trimmer.cancel()
        self.begin_drain()
        grace = self.settings.shutdown_grace_s
        for served in self.models.values():
            left = await served.batcher.close(timeout_s=grace)
            if left:
                logger.warning("%s: %d queued images were not served within the grace period", served.name, left)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        if self.stage_pool is not self.forward_pool:
            self.stage_pool.shutdown(wait=False, cancel_futures=True)
        # A forward still running must finish before the process exits; wait off the loop.
        await asyncio.to_thread(self.forward_pool.shutdown, wait=True, cancel_futures=True)

    def lookup(self, name: str) -> ServedModel:
        spec = find_spec(name)
        served = self.models.get(spec.name) if spec is not None else None
        if served is None:
            if self.phase in (Phase.STARTING, Phase.FAILED):
                self.ensure_accepting()
            loaded = ", ".join(self.models)
            raise ModelNotFound(f"model {name!r} is not served here; loaded models: {loaded}")
        return served

    def metric_label(self, name: str) -> str:
        """The model label for a request's metrics: a configured model's canonical name, even before it
        has loaded; anything else is `unknown`, so a scan of random names cannot grow the label set."""
        spec = find_spec(name)
        if spec is not None and spec.name in self.configured_models:
            return spec.name
        return "unknown"

    def ensure_accepting(self) -> None:
        if self.phase is Phase.READY:
            return
        if self.phase is Phase.DRAINING:
            raise ServiceUnavailable("the server is shutting down and accepts no new requests")
        if self.phase is Phase.FAILED:
            raise ServiceUnavailable(f"the server failed to start: {self.startup_error}")
        raise ServiceUnavailable("the models are still loading; retry when /ping says Healthy")
