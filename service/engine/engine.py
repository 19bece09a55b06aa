"""The serving engine: the server's phase, its thread pools, one pipeline per model, and the drain.

Phases only move forward: STARTING → READY → DRAINING, or to FAILED. A drain that began while the
models were still loading stays a drain when they finish. The drain has one deadline, set when it
begins (SIGTERM): the HTTP server's wait for in-flight requests and the batchers' wait for queued
images both end by it, so that shutdown takes the grace period once, not twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from enum import StrEnum

import torch

from service import memory
from service.config import ServerPlan
from service.engine.pipeline import ModelPipeline
from service.engine.pools import Pools
from service.errors import ModelNotFound, ServiceUnavailable
from service.metrics import Metrics
from service.models.loaded import LoadedModel
from service.models.sources import configured_names

logger = logging.getLogger(__name__)

_TRIM_CHECK_S = 1.0  # how often the trimmer looks at the forward count
_TRIM_UNDER_LOAD_S = 10.0  # the longest it waits while forwards keep coming


class Phase(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class Engine:
    def __init__(self, plan: ServerPlan, metrics: Metrics, device: torch.device) -> None:
        self.plan = plan
        self.metrics = metrics
        self.device = device
        self.phase = Phase.STARTING
        self.failure: str | None = None
        self.pipelines: dict[str, ModelPipeline] = {}
        # Every name a configured model answers to (its aliases too) → its canonical name.
        self.model_names = configured_names(plan.models)
        self.pools = Pools(plan)
        self.drain_deadline: float | None = None  # time.monotonic() by which the drain must end
        self._trimmer: asyncio.Task[None] | None = None

    # -- phases -------------------------------------------------------------------------------------

    def add_model(self, loaded: LoadedModel) -> None:
        # JPEGs the device decoder rejects are decoded on the host: in the decode pool, not on the
        # stage/forward thread, so a batch of them never stalls the model.
        loaded.runner.use_fallback_executor(self.pools.decode)
        pipeline = ModelPipeline(
            loaded,
            self.plan,
            self.pools,
            self.metrics,
            on_failure=lambda reason: self.mark_failed(f"the batcher of {loaded.name} died: {reason}"),
        )
        self.metrics.init_model(loaded.name, queue_capacity=self.plan.max_queue_size)
        self.metrics.model_info.labels(
            loaded.name,
            loaded.card.architecture,
            str(self.device),
            self.plan.dtype,
            loaded.weights.describe(),
            str(loaded.runner.runtime.info),
        ).set(1)
        self.pipelines[loaded.name] = pipeline
        if self.phase is Phase.DRAINING:
            pipeline.admission.stop_admitting()
        pipeline.start()

    def mark_ready(self) -> None:
        if self.phase is not Phase.STARTING:
            logger.info("models loaded, but the server is %s: it stays so", self.phase.value)
            return
        self._trimmer = asyncio.get_running_loop().create_task(self._give_back_memory_periodically())
        # Loading's temporaries (a checkpoint's parse, an export, a session's graph optimisation) are
        # freed by now, but glibc keeps the pages until asked: hand them back before serving.
        memory.give_back_free_memory()
        self.phase = Phase.READY
        self.metrics.ready.set(1)
        logger.info("ready: serving %s on %s", ", ".join(self.pipelines), self.device)

    def mark_failed(self, message: str) -> None:
        self.failure = message
        self.metrics.ready.set(0)
        if self.phase is Phase.DRAINING:
            return
        self.phase = Phase.FAILED
        logger.error("the server is failed and refuses requests: %s", message)

    def begin_drain(self) -> None:
        """Readiness turns 503 and admission stops at once; admitted work still runs until the deadline."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.plan.shutdown_grace_s
        self.phase = Phase.DRAINING
        self.metrics.ready.set(0)
        for pipeline in self.pipelines.values():
            pipeline.admission.stop_admitting()

    def drain_time_left_s(self) -> float:
        if self.drain_deadline is None:
            return self.plan.shutdown_grace_s
        return max(0.0, self.drain_deadline - time.monotonic())

    async def close(self) -> None:
        if self._trimmer is not None:
            self._trimmer.cancel()
        self.begin_drain()
        for pipeline in self.pipelines.values():
            left = await pipeline.batcher.close(timeout_s=self.drain_time_left_s())
            if left:
                logger.warning("%s: %d queued images were not served within the grace period", pipeline.name, left)
        await self.pools.close()

    # -- lookups ------------------------------------------------------------------------------------

    def lookup(self, name: str) -> ModelPipeline:
        canonical = self.model_names.get(name)
        pipeline = self.pipelines.get(canonical) if canonical is not None else None
        if pipeline is None:
            if self.phase in (Phase.STARTING, Phase.FAILED):
                self.ensure_accepting()
            loaded = ", ".join(self.pipelines)
            raise ModelNotFound(f"model {name!r} is not served here; loaded models: {loaded}")
        return pipeline

    def metric_label(self, name: str) -> str:
        """The model label for a request's metrics: a configured model's canonical name, even before it
        has loaded; anything else is `unknown`, so a scan of random names cannot grow the label set."""
        return self.model_names.get(name, "unknown")

    def ensure_accepting(self) -> None:
        if self.phase is Phase.READY:
            return
        if self.phase is Phase.DRAINING:
            raise ServiceUnavailable("the server is shutting down and accepts no new requests")
        if self.phase is Phase.FAILED:
            raise ServiceUnavailable(f"the server failed: {self.failure}")
        raise ServiceUnavailable("the models are still loading; retry when /ping says Healthy")

    async def _give_back_memory_periodically(self) -> None:
        """Trim once a burst of work ends (a second without forwards), and every 10 s under steady
        load: what an idle server holds is then what it keeps, not the last burst's free pages."""
        loop = asyncio.get_running_loop()
        trimmed_at = seen = self.pools.forwards
        last_trim = loop.time()
        while True:
            await asyncio.sleep(_TRIM_CHECK_S)
            count = self.pools.forwards
            went_idle = count == seen and count != trimmed_at
            overdue = count != trimmed_at and loop.time() - last_trim >= _TRIM_UNDER_LOAD_S
            seen = count
            if went_idle or overdue:
                trimmed_at, last_trim = count, loop.time()
                # On the forward thread, so it never runs during a forward.
                await loop.run_in_executor(self.pools.forward, memory.give_back_free_memory)
