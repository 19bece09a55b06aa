"""A dynamic micro-batcher: many concurrent callers, few full batches. Asyncio only, no torch.

Shape borrowed from Ray Serve's batcher: the window opens when the first item arrives and closes when
the batch is full or `max_delay_s` has passed; an event wakes the collector; abandoned items are
skipped; the handler's output length is checked; an exception reaches every member of the batch,
while an exception the handler returns in an item's place fails that item alone.

`max_in_flight` batches may be in the handler at once (1 by default). With 2, the next batch is taken
and handed over while the current one computes, so a GPU handler can copy it to the device meanwhile.

Admission is separate from submission so that the HTTP edge can refuse a request *before* it reads
and decodes the body: `reserve()` takes slots up front, `Reservation.submit()` spends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from service.errors import DeadlineExceeded, InferenceFailed, QueueFull, ServeError, ServiceUnavailable

InT = TypeVar("InT")
OutT = TypeVar("OutT")

logger = logging.getLogger(__name__)

# One output per input, in order; an exception in an item's place fails that item alone.
BatchHandler = Callable[[list[InT]], Awaitable[Sequence[OutT | BaseException]]]


class BatchObserver(Protocol):
    """What the batcher reports; the metrics module implements it, tests may record it."""

    def on_batch(self, size: int, queue_waits_s: Sequence[float]) -> None: ...
    def on_forward(self, duration_s: float, failed: bool) -> None: ...
    def on_dropped(self, reason: str, count: int) -> None: ...
    def on_depth(self, depth: int) -> None: ...


class NullObserver:
    def on_batch(self, size: int, queue_waits_s: Sequence[float]) -> None:
        pass

    def on_forward(self, duration_s: float, failed: bool) -> None:
        pass

    def on_dropped(self, reason: str, count: int) -> None:
        pass

    def on_depth(self, depth: int) -> None:
        pass


@dataclass(eq=False)
class Ticket(Generic[InT, OutT]):
    """One submitted item: its future resolves to the handler's output for it."""

    item: InT
    future: asyncio.Future[OutT]
    deadline: float
    enqueued_at: float
    _batcher: MicroBatcher[InT, OutT] = field(repr=False)
    taken: bool = False

    def abandon(self, reason: str) -> bool:
        """Withdraw the item (caller gone or out of time); False if its forward already started."""
        if self.taken or self.future.done():
            return False
        self.future.cancel()
        self._batcher._observer.on_dropped(reason, 1)
        return True


class Reservation(Generic[InT, OutT]):
    """Queue slots held by one admitted request, spent one per submitted image."""

    def __init__(self, batcher: MicroBatcher[InT, OutT], count: int) -> None:
        self._batcher = batcher
        self.unspent = count

    def grow(self, count: int) -> None:
        self._batcher._admit(count)
        self.unspent += count

    def submit(self, item: InT, *, deadline: float) -> Ticket[InT, OutT]:
        if self.unspent <= 0:
            raise RuntimeError("submit() without a reserved slot")
        self.unspent -= 1
        return self._batcher._enqueue(item, deadline)

    def release(self) -> None:
        """Give back the slots that were never spent (a request that failed before submitting)."""
        if self.unspent:
            self._batcher._free(self.unspent)
            self.unspent = 0

    def __enter__(self) -> Reservation[InT, OutT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class MicroBatcher(Generic[InT, OutT]):
    def __init__(
        self,
        handler: BatchHandler[InT, OutT],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        observer: BatchObserver | None = None,
        name: str = "batcher",
        max_in_flight: int = 1,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_delay_s < 0 or max_in_flight < 1:
            raise ValueError("max_batch_size, max_queue_size and max_in_flight must be >= 1, max_delay_s >= 0")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        self.max_in_flight = max_in_flight
        self._handler = handler
        self._observer: BatchObserver = observer or NullObserver()
        self._queue: deque[Ticket[InT, OutT]] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = 0  # batches being collected or in the handler
        self._in_flight_slots = asyncio.Semaphore(max_in_flight)
        self._runs: set[asyncio.Task[None]] = set()
        self._slots_in_use = 0
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        # An estimate of forward time per image, for an honest Retry-After.
        self._seconds_per_item = 0.05
        self.batches_run = 0
        self.items_run = 0

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._collect_forever(), name=self.name)

    def stop_admitting(self) -> None:
        """Refuse new reservations; what is queued still runs."""
        self._closing = True

    async def close(self, timeout_s: float) -> int:
        """Refuse new work, finish what was admitted within `timeout_s`, then fail what is left.

        Returns how many queued items could not be served in time.
        """
        self._closing = True
        left = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._queue or not self._idle.is_set():
                    self._wakeup.set()
                    await self._idle.wait()
                    await asyncio.sleep(0)
        for task in [self._task, *self._runs]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None
        while self._queue:
            ticket = self._queue.popleft()
            if not ticket.future.done():
                left += 1
                ticket.future.set_exception(ServiceUnavailable("the server shut down before this image ran"))
        return left

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def depth(self) -> int:
        """Slots held by admitted images that have not reached a forward yet."""
        return self._slots_in_use

    # -- admission ----------------------------------------------------------------------------------

    def reserve(self, count: int = 1) -> Reservation[InT, OutT]:
        self._admit(count)
        return Reservation(self, count)

    def _admit(self, count: int) -> None:
        if self._closing:
            raise ServiceUnavailable("the server is draining and accepts no new work")
        if self._slots_in_use + count > self.max_queue_size:
            self._observer.on_dropped("queue_full", count)
            raise QueueFull(
                f"the queue for this model is full ({self._slots_in_use} of {self.max_queue_size} images "
                "waiting); retry after the Retry-After seconds",
                retry_after_s=self._retry_after_s(),
            )
        self._slots_in_use += count
        self._observer.on_depth(self._slots_in_use)

    def _free(self, count: int) -> None:
        self._slots_in_use -= count
        self._observer.on_depth(self._slots_in_use)

    def _retry_after_s(self) -> int:
        return max(1, math.ceil(self._slots_in_use * self._seconds_per_item))

    def _enqueue(self, item: InT, deadline: float) -> Ticket[InT, OutT]:
        loop = asyncio.get_running_loop()
        ticket: Ticket[InT, OutT] = Ticket(item, loop.create_future(), deadline, loop.time(), self)
        self._queue.append(ticket)
        self._wakeup.set()
        return ticket

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
        finally:
            self._end()

    async def _fill_window(self, loop: asyncio.AbstractEventLoop) -> None:
        # The window opened when the oldest item arrived: items that queued up during the previous
        # forward are already past it, so a loaded server never waits here.
        window_closes = self._queue[0].enqueued_at + self.max_delay_s
        while len(self._queue) < self.max_batch_size and not self._closing:
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
        self._free(taken)
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
        self._seconds_per_item = 0.8 * self._seconds_per_item + 0.2 * (duration / len(batch))
