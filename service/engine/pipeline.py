"""One model's way from uploaded bytes to probabilities: admit → prepare → submit → results.

This is how a batch reaches the device: admission holds the queue slots, the decode pool turns bytes
into model inputs, the micro-batcher gathers inputs from many requests, and the runner's `stage` and
`run` move each batch to the device and through the model on their own threads. Nothing here knows
HTTP: the edge hands in bytes, a deadline and a future that completes when its client goes away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from service.admission import Admission, Reservation
from service.batching import MicroBatcher, Ticket
from service.config import ServerPlan
from service.engine.pools import Pools
from service.errors import ClientDisconnected, DeadlineExceeded, ServeError
from service.imaging import ModelInput, inspect_jpeg, preprocess
from service.metrics import Metrics
from service.models.registry import LoadedModel
from service.models.runner import ImageResult, Result
from service.observers import GuardedObserver


class ModelPipeline:
    def __init__(
        self,
        loaded: LoadedModel,
        plan: ServerPlan,
        pools: Pools,
        metrics: Metrics,
        *,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.loaded = loaded
        self._plan = plan
        self._pools = pools
        self._preprocess_seconds = metrics.preprocess_duration.labels(loaded.name)
        observer = GuardedObserver(metrics.observer(loaded.name), f"model {loaded.name}")
        self.admission = Admission(plan.max_queue_size, observer=observer)
        self.batcher: MicroBatcher[ModelInput, Result] = MicroBatcher(
            self._forward,
            admission=self.admission,
            max_batch_size=plan.max_batch_size,
            max_delay_s=plan.max_delay_s,
            observer=observer,
            name=f"batcher-{loaded.name}",
            max_in_flight=plan.max_batches_in_flight,
            on_failure=on_failure,
        )

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def labels(self) -> tuple[str, ...]:
        return self.loaded.labels

    def start(self) -> None:
        self.batcher.start()

    # -- the four steps -----------------------------------------------------------------------------

    def admit(self, count: int = 1) -> Reservation:
        """Hold queue slots before the body is read: an overloaded server refuses in microseconds."""
        return self.admission.reserve(count)

    async def prepare(self, uploads: list[bytes]) -> list[ModelInput]:
        """Decode and resize every upload in the decode pool; the first bad one fails the request."""
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self._pools.decode, self._prepare_one, data) for data in uploads]
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, ServeError):
                if len(uploads) > 1:
                    outcome.message = f"image {index + 1} of {len(uploads)}: {outcome.message}"
                raise outcome
            if isinstance(outcome, BaseException):
                raise outcome
        return [o for o in outcomes if not isinstance(o, BaseException)]

    def submit(self, reservation: Reservation, images: list[ModelInput], *, deadline: float) -> list[Ticket[Any, Any]]:
        """Queue each image on a slot the reservation holds."""
        tickets: list[Ticket[Any, Any]] = []
        for image in images:
            reservation.spend()
            tickets.append(self.batcher.enqueue(image, deadline=deadline))
        return tickets

    async def results(
        self, tickets: list[Ticket[Any, Any]], *, deadline: float, client_gone: Awaitable[Any]
    ) -> list[ImageResult]:
        """Every image's probabilities and features, in order. Gives up at the deadline, when the client goes away,
        or when one image fails; the images of the request that have not run yet are then withdrawn,
        so that no forward computes what nobody will read (cancellation at shutdown included)."""
        loop = asyncio.get_running_loop()
        gone = asyncio.ensure_future(client_gone)
        waiting: set[asyncio.Future[Any]] = {t.future for t in tickets}
        try:
            while waiting:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    _abandon(tickets, "deadline")
                    raise DeadlineExceeded("the request did not finish within the request timeout")
                done, waiting = await asyncio.wait(waiting | {gone}, timeout=timeout, return_when="FIRST_COMPLETED")
                if gone in done:
                    _abandon(tickets, "disconnected")
                    raise ClientDisconnected()
                waiting.discard(gone)
                for future in done:
                    error = future.exception()
                    if error is not None:
                        # Its siblings are dropped because the request failed, not for a reason of their own.
                        _abandon(tickets, getattr(error, "reject_reason", None) or "request_failed")
                        raise error
            return [t.future.result() for t in tickets]
        except asyncio.CancelledError:
            _abandon(tickets, "cancelled")
            raise
        finally:
            gone.cancel()

    # -- the work on the pools ----------------------------------------------------------------------

    def _prepare_one(self, data: bytes) -> ModelInput:
        started = time.perf_counter()
        spec = self.loaded.preprocessing
        max_pixels = self._plan.max_image_pixels
        try:
            # With --decode-on-device a JPEG's header is checked here and its pixels decoded with
            # its batch on the device; any other image is decoded here as always.
            encoded = inspect_jpeg(data, spec, max_pixels=max_pixels) if self._plan.decode_on_device else None
            return encoded if encoded is not None else preprocess(data, spec, max_pixels=max_pixels)
        finally:
            self._preprocess_seconds.observe(time.perf_counter() - started)

    async def _forward(self, images: list[ModelInput]) -> list[Result]:
        loop = asyncio.get_running_loop()
        runner = self.loaded.runner
        pools = self._pools
        pools.forwards += 1
        if pools.stage is pools.forward:
            return await loop.run_in_executor(pools.forward, runner.results, images)
        staged = await loop.run_in_executor(pools.stage, runner.stage, images)
        return await loop.run_in_executor(pools.forward, runner.run_results, staged)


def _abandon(tickets: list[Ticket[Any, Any]], reason: str) -> None:
    for ticket in tickets:
        ticket.abandon(reason)
