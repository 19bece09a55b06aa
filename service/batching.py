"""A dynamic micro-batcher: many concurrent callers, few full batches. Asyncio only, no torch.

Shape borrowed from Ray Serve's batcher: the window opens when the first item arrives and closes when
the batch is full or `max_delay_s` has passed; an event wakes the collector; abandoned items are
skipped; the handler's output length is checked; an exception reaches every member of the batch,
while an exception the handler returns in an item's place fails that item alone.

`max_in_flight` batches may be in the handler at once (1 by default). With 2, the next batch is taken
and handed over while the current one computes, so a GPU handler can copy it to the device meanwhile.

Admission (`service/admission.py`) decides who may queue; the batcher gives an item's slot back when
it takes the item off the queue. If the collector ever dies, every queued caller is failed at once
and `on_failure` is told why, so that readiness can turn failed instead of every request timing out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from service.admission import Admission
from service.errors import DeadlineExceeded, InferenceFailed, ServeError, ServiceUnavailable
from service.observers import BatchObserver, GuardedObserver, NullObserver

InT = TypeVar("InT")
OutT = TypeVar("OutT")

logger = logging.getLogger(__name__)

# One output per input, in order; an exception in an item's place fails that item alone.
BatchHandler = Callable[[list[InT]], Awaitable[Sequence[OutT | BaseException]]]


@dataclass(eq=False)
class Ticket(Generic[InT, OutT]):
    """One submitted item: its future resolves to the handler's output for it."""

    item: InT
    future: asyncio.Future[OutT]
    deadline: float
    enqueued_at: float
    # Told why an item was withdrawn (a `rejected_total` reason), or None when that is not a rejection.
    on_abandon: Callable[[str | None], None]
    taken: bool = False

    def abandon(self, reason: str | None) -> bool:
        """Withdraw the item (caller gone or out of time); False if its forward already started."""
        if self.taken or self.future.done():
            return False
        self.future.cancel()
        self.on_abandon(reason)
        return True


class MicroBatcher(Generic[InT, OutT]):
    def __init__(
        self,
        handler: BatchHandler[InT, OutT],
        *,
        admission: Admission,
        max_batch_size: int,
        max_delay_s: float,
        observer: BatchObserver | None = None,
        name: str = "batcher",
        max_in_flight: int = 1,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_delay_s < 0 or max_in_flight < 1:
            raise ValueError("max_batch_size and max_in_flight must be >= 1, max_delay_s >= 0")
        self.name = name
        self.admission = admission
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_in_flight = max_in_flight
        self._handler = handler
        self._observer = GuardedObserver(observer or NullObserver(), name)
        self._on_failure = on_failure
        self._queue: deque[Ticket[InT, OutT]] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = 0  # batches being collected or in the handler
        self._in_flight_slots = asyncio.Semaphore(max_in_flight)
        self._runs: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self.failure: str | None = None
        self.batches_run = 0
        self.items_run = 0

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._collect_forever(), name=self.name)
            self._task.add_done_callback(self._collector_ended)

    async def close(self, timeout_s: float) -> int:
        """Refuse new work, finish what was admitted within `timeout_s`, then fail what is left.

        Returns how many queued items could not be served in time.
        """
        self.admission.stop_admitting()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout_s)):
                while self._queue or not self._idle.is_set():
                    self._wakeup.set()
                    await self._idle.wait()
                    await asyncio.sleep(0)
        tasks = [task for task in [self._task, *self._runs] if task is not None]
        self._task = None
        for task in tasks:
            task.cancel()
        if tasks:
            # asyncio.wait, not `await task`: the tasks' CancelledError stays theirs, while one aimed
            # at close() itself still reaches its caller.
            await asyncio.wait(tasks)
        return self._fail_queued(ServiceUnavailable("the server shut down before this image ran"))

    @property
    def depth(self) -> int:
        """Slots held by admitted images that have not reached a forward yet."""
        return self.admission.in_use

    @property
    def queued(self) -> int:
        """Items waiting in the queue (abandoned ones included until the collector skips them)."""
        return len(self._queue)

    @property
    def healthy(self) -> bool:
        return self.failure is None

    # -- submission ---------------------------------------------------------------------------------

    def enqueue(self, item: InT, *, deadline: float) -> Ticket[InT, OutT]:
        """Queue an item whose admission slot is already held (see `Reservation.spend`)."""
        if self.failure is not None:
            raise ServiceUnavailable(f"the batcher of this model failed: {self.failure}")
        loop = asyncio.get_running_loop()
        ticket: Ticket[InT, OutT] = Ticket(item, loop.create_future(), deadline, loop.time(), self._abandoned)
        self._queue.append(ticket)
        self._wakeup.set()
        return ticket

    def _abandoned(self, reason: str | None) -> None:
        if reason is not None:
            self._observer.on_dropped(reason, 1)

    def _fail_queued(self, error: ServeError) -> int:
        left = 0
        while self._queue:
            ticket = self._queue.popleft()
            self.admission.release(1)
            if not ticket.future.done():
                left += 1
                ticket.future.set_exception(error)
        return left

    def _collector_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task is not self._task:
            return
        error = task.exception()
        self.failure = f"{type(error).__name__}: {error}" if error is not None else "the collector stopped"
        logger.error("%s: the batch collector died (%s); the model is failed", self.name, self.failure)
        self._fail_queued(ServiceUnavailable(f"the batcher of this model failed: {self.failure}"))
        if self._on_failure is not None:
            self._on_failure(self.failure)

    # -- the collector ------------------------------------------------------------------------------

    async def _collect_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Only take a batch the handler can start: with one in flight, the queue fills up
            # behind the running forward and the next batch is as full as it can be.
            await self._in_flight_slots.acquire()
            self._begin()
            handed_over = False
            try:
                await self._fill_window(loop)
                batch = self._take_batch(loop)
                if batch:
                    run = loop.create_task(self._run_then_release(batch, loop), name=f"{self.name}-run")
                    self._runs.add(run)
                    run.add_done_callback(self._runs.discard)
                    handed_over = True
            finally:
                if not handed_over:
                    self._end()

    def _begin(self) -> None:
        self._busy += 1
        self._idle.clear()

    def _end(self) -> None:
        self._in_flight_slots.release()
        self._busy -= 1
        if self._busy == 0:
            self._idle.set()

    async def _run_then_release(self, batch: list[Ticket[InT, OutT]], loop: asyncio.AbstractEventLoop) -> None:
        try:
            await self._run(batch, loop)
        except Exception:
            # _run answers every caller itself; this is the net under a bug in it, so that no
            # caller waits for a future that nothing will ever resolve.
            logger.exception("%s: a batch run failed unexpectedly", self.name)
            for ticket in batch:
                if not ticket.future.done():
                    ticket.future.set_exception(InferenceFailed("the model failed on this batch"))
        finally:
            self._end()

    async def _fill_window(self, loop: asyncio.AbstractEventLoop) -> None:
        # The window opened when the oldest item arrived: items that queued up during the previous
        # forward are already past it, so a loaded server never waits here.
        window_closes = self._queue[0].enqueued_at + self.max_delay_s
        while len(self._queue) < self.max_batch_size and not self.admission.closing:
            remaining = window_closes - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()

    def _take_batch(self, loop: asyncio.AbstractEventLoop) -> list[Ticket[InT, OutT]]:
        now = loop.time()
        batch: list[Ticket[InT, OutT]] = []
        taken = 0
        expired = 0
        while self._queue and len(batch) < self.max_batch_size:
            ticket = self._queue.popleft()
            taken += 1
            if ticket.future.done():  # abandoned, already counted by abandon()
                continue
            if now >= ticket.deadline:
                expired += 1
                ticket.future.set_exception(
                    DeadlineExceeded("the request timed out in the queue before its image could run")
                )
                continue
            ticket.taken = True
            batch.append(ticket)
        self.admission.release(taken)
        if expired:
            self._observer.on_dropped("deadline", expired)
        return batch

    async def _run(self, batch: list[Ticket[InT, OutT]], loop: asyncio.AbstractEventLoop) -> None:
        started = loop.time()
        self._observer.on_batch(len(batch), [started - t.enqueued_at for t in batch])
        failed = False
        try:
            outputs = await self._handler([t.item for t in batch])
            if len(outputs) != len(batch):
                raise InferenceFailed(f"the model returned {len(outputs)} outputs for {len(batch)} inputs")
        except asyncio.CancelledError:
            for ticket in batch:
                if not ticket.future.done():
                    ticket.future.set_exception(ServiceUnavailable("the server stopped during this forward"))
            raise
        except Exception as exc:
            failed = True
            logger.exception("forward of a batch of %d failed in %s", len(batch), self.name)
            error = exc if isinstance(exc, ServeError) else InferenceFailed("the model failed on this batch")
            for ticket in batch:
                if not ticket.future.done():
                    ticket.future.set_exception(error)
        else:
            for ticket, output in zip(batch, outputs, strict=True):
                if ticket.future.done():
                    continue
                if isinstance(output, BaseException):
                    ticket.future.set_exception(output)
                else:
                    ticket.future.set_result(output)
        finally:
            duration = loop.time() - started
            self._observer.on_forward(duration, failed)
        self.batches_run += 1
        self.items_run += len(batch)
        estimate = self.admission.seconds_per_item
        self.admission.seconds_per_item = 0.8 * estimate + 0.2 * (duration / len(batch))
