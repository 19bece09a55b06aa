"""Admission: the queue slots of one model, handed out before a request's body is read.

A request is admitted with one slot, so an overloaded server refuses it in microseconds (429 with an
honest `Retry-After`) instead of after reading and decoding its upload. Once its body shows how many
images it holds, the admitted request grows its reservation. Admitted requests are never refused
afterwards, not even while the server drains (every admitted request is answered), and they come
before new ones: a growth that does not fit yet waits, first come first served, while new requests
are refused. So a many-image request cannot be starved by a steady stream of single images, and
the queue never holds more than its capacity. Slots come back when the batcher takes their images.

Asyncio only, no torch, no HTTP.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass

from service.errors import DeadlineExceeded, InvalidInput, QueueFull, ServiceUnavailable
from service.observers import BatchObserver, NullObserver


@dataclass(eq=False)
class _Growth:
    count: int
    granted: asyncio.Future[None]


class Admission:
    """The slots of one model's queue: `capacity` admitted images that have not reached a forward."""

    def __init__(self, capacity: int, *, observer: BatchObserver | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.in_use = 0
        self.closing = False
        self._observer: BatchObserver = observer or NullObserver()
        self._waiting: deque[_Growth] = deque()
        # Forward time per image, kept up to date by the batcher, for an honest Retry-After.
        self.seconds_per_item = 0.05

    def reserve(self, count: int = 1) -> Reservation:
        """Admit a new request with `count` slots, or refuse it at once."""
        if self.closing:
            raise ServiceUnavailable("the server is draining and accepts no new work")
        self._refuse_if_never_fits(count)
        if self._waiting or self.in_use + count > self.capacity:
            self._observer.on_dropped("queue_full", count)
            raise QueueFull(
                f"the queue for this model is full ({self.in_use} of {self.capacity} images waiting); "
                "retry after the Retry-After seconds",
                retry_after_s=self.retry_after_s(),
            )
        self._take(count)
        return Reservation(self, count)

    def stop_admitting(self) -> None:
        """Refuse new requests; admitted ones may still grow and run."""
        self.closing = True

    def release(self, count: int) -> None:
        """Give slots back (their images reached a forward, or were never submitted)."""
        if count <= 0:
            return
        self.in_use -= count
        self._grant_waiting()
        self._observer.on_depth(self.in_use)

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.in_use * self.seconds_per_item))

    async def _grow(self, count: int, deadline: float) -> None:
        if not self._waiting and self.in_use + count <= self.capacity:
            self._take(count)
            return
        growth = _Growth(count, asyncio.get_running_loop().create_future())
        self._waiting.append(growth)
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(growth.granted)
        except BaseException as exc:
            if growth.granted.done():  # granted just as we gave up: the slots are ours to return
                self.release(count)
            else:
                self._waiting.remove(growth)
                growth.granted.cancel()
                self._grant_waiting()  # the ones behind may fit now
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded("the request timed out waiting for room in the queue for its images") from None
            raise

    def _take(self, count: int) -> None:
        self.in_use += count
        self._observer.on_depth(self.in_use)

    def _grant_waiting(self) -> None:
        while self._waiting and self.in_use + self._waiting[0].count <= self.capacity:
            growth = self._waiting.popleft()
            self._take(growth.count)
            growth.granted.set_result(None)

    def _refuse_if_never_fits(self, count: int) -> None:
        if count > self.capacity:
            # Not a 429: no amount of waiting makes room for it.
            raise InvalidInput(
                f"{count} images cannot fit in this model's queue of {self.capacity}; "
                "send fewer images a request (the server's --max-queue-size)"
            )


class Reservation:
    """Slots held by one admitted request, spent one per submitted image."""

    def __init__(self, admission: Admission, count: int) -> None:
        self._admission = admission
        self.held = count  # slots held and not yet spent on a submitted image

    async def grow_to(self, total: int, *, deadline: float) -> None:
        """Hold `total` unspent slots, waiting (before new requests, until `deadline`) if need be."""
        extra = total - self.held
        if extra <= 0:
            return
        self._admission._refuse_if_never_fits(total)
        await self._admission._grow(extra, deadline)
        self.held += extra

    def spend(self) -> None:
        """One slot now belongs to a queued image; the batcher gives it back when it takes it."""
        if self.held <= 0:
            raise RuntimeError("spend() without a reserved slot")
        self.held -= 1

    def release(self) -> None:
        """Give back the slots never spent (a request that failed before submitting)."""
        held, self.held = self.held, 0
        self._admission.release(held)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
