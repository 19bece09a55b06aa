"""The micro-batcher with a fake batch function: gated by events, not sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from service.admission import Admission
from service.batching import MicroBatcher
from service.errors import DeadlineExceeded, InferenceFailed, QueueFull, ServiceUnavailable

FAR = 1e9  # a deadline that never passes


class Recorder:
    """A batch function that records each batch and can be held at a gate."""

    def __init__(self, *, gated: bool = False, fail_with: Exception | None = None) -> None:
        self.batches: list[list[int]] = []
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self.fail_with = fail_with
        self.wrong_length = False

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        outputs = [item * 10 for item in items]
        return outputs[:-1] if self.wrong_length else outputs


class Drops:
    def __init__(self) -> None:
        self.reasons: dict[str, int] = {}
        self.sizes: list[int] = []

    def on_batch(self, size: int, queue_waits_s: Sequence[float]) -> None:
        self.sizes.append(size)

    def on_forward(self, duration_s: float, failed: bool) -> None:
        pass

    def on_dropped(self, reason: str, count: int) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + count

    def on_depth(self, depth: int) -> None:
        pass


def make(
    handler: Recorder,
    *,
    batch: int = 4,
    delay: float = FAR,
    queue: int = 100,
    observer: Drops | None = None,
    in_flight: int = 1,
):
    batcher: MicroBatcher[int, int] = MicroBatcher(
        handler,
        admission=Admission(queue, observer=observer),
        max_batch_size=batch,
        max_delay_s=delay,
        observer=observer,
        max_in_flight=in_flight,
    )
    batcher.start()
    return batcher


def submit(batcher: MicroBatcher[int, int], item: int, deadline: float = FAR):
    with batcher.admission.reserve(1) as reservation:
        reservation.spend()
        return batcher.enqueue(item, deadline=asyncio.get_running_loop().time() + deadline)


async def test_a_full_batch_is_released_without_waiting_for_the_delay():
    handler = Recorder()
    batcher = make(handler, batch=4, delay=FAR)
    tickets = [submit(batcher, i) for i in range(4)]
    results = await asyncio.wait_for(asyncio.gather(*(t.future for t in tickets)), timeout=5)
    assert results == [0, 10, 20, 30]
    assert handler.batches == [[0, 1, 2, 3]]
    await batcher.close(timeout_s=1)


async def test_a_partial_batch_is_released_when_the_delay_passes():
    handler = Recorder()
    batcher = make(handler, batch=8, delay=0.02)
    tickets = [submit(batcher, i) for i in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*(t.future for t in tickets)), timeout=5)
    assert results == [0, 10, 20]
    assert handler.batches == [[0, 1, 2]]
    await batcher.close(timeout_s=1)


async def test_items_queued_during_a_forward_form_the_next_full_batch():
    handler = Recorder(gated=True)
    batcher = make(handler, batch=3, delay=0)
    first = submit(batcher, 0)
    await handler.entered.wait()
    later = [submit(batcher, i) for i in range(1, 7)]
    handler.gate.set()
    await asyncio.wait_for(asyncio.gather(first.future, *(t.future for t in later)), timeout=5)
    assert handler.batches == [[0], [1, 2, 3], [4, 5, 6]]
    await batcher.close(timeout_s=1)


async def batches_started(handler: Recorder, count: int, timeout_s: float = 5) -> None:
    async with asyncio.timeout(timeout_s):
        while len(handler.batches) < count:
            handler.entered.clear()
            await handler.entered.wait()


async def test_with_two_in_flight_the_next_batch_is_handed_over_during_the_forward():
    handler = Recorder(gated=True)
    batcher = make(handler, batch=2, delay=0, in_flight=2)
    tickets = [submit(batcher, i) for i in range(6)]
    await batches_started(handler, 2)
    for _ in range(20):  # however long we wait, a third batch never starts while two are running
        await asyncio.sleep(0)
    assert handler.batches == [[0, 1], [2, 3]]
    handler.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*(t.future for t in tickets)), timeout=5)
    assert results == [0, 10, 20, 30, 40, 50]
    assert handler.batches == [[0, 1], [2, 3], [4, 5]]
    await batcher.close(timeout_s=1)


async def test_close_waits_for_every_batch_in_flight():
    handler = Recorder(gated=True)
    batcher = make(handler, batch=1, delay=0, in_flight=2)
    tickets = [submit(batcher, i) for i in range(3)]
    await batches_started(handler, 2)
    closing = asyncio.create_task(batcher.close(timeout_s=5))
    await asyncio.sleep(0.01)
    assert not closing.done()
    handler.gate.set()
    assert await asyncio.wait_for(closing, timeout=5) == 0
    assert [t.future.result() for t in tickets] == [0, 10, 20]


async def test_a_full_queue_refuses_at_once_with_retry_after():
    drops = Drops()
    batcher = make(Recorder(), batch=2, queue=3, observer=drops)
    reservation = batcher.admission.reserve(3)
    with pytest.raises(QueueFull) as refused:
        batcher.admission.reserve(1)
    assert refused.value.status == 429
    assert int(refused.value.headers["Retry-After"]) >= 1
    assert drops.reasons == {"queue_full": 1}
    reservation.release()
    batcher.admission.reserve(1).release()  # slots came back
    await batcher.close(timeout_s=1)


async def test_an_expired_item_is_never_computed():
    drops = Drops()
    handler = Recorder(gated=True)
    batcher = make(handler, batch=1, delay=0, observer=drops)
    blocker = submit(batcher, 1)
    await handler.entered.wait()
    expired = submit(batcher, 2, deadline=0.0)  # already past when the collector reaches it
    handler.gate.set()
    assert await blocker.future == 10
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(expired.future, timeout=5)
    assert handler.batches == [[1]]
    assert drops.reasons == {"deadline": 1}
    await batcher.close(timeout_s=1)


async def test_an_abandoned_caller_is_skipped_before_the_forward():
    drops = Drops()
    handler = Recorder(gated=True)
    batcher = make(handler, batch=4, delay=0, observer=drops)
    blocker = submit(batcher, 1)
    await handler.entered.wait()
    gone = submit(batcher, 2)
    stays = submit(batcher, 3)
    assert gone.abandon("disconnected") is True
    handler.gate.set()
    assert await asyncio.wait_for(stays.future, timeout=5) == 30
    assert await blocker.future == 10
    assert handler.batches == [[1], [3]]
    assert drops.reasons == {"disconnected": 1}
    assert blocker.abandon("disconnected") is False  # already computed: too late to withdraw
    await batcher.close(timeout_s=1)


async def test_an_exception_reaches_every_member_and_the_next_batch_runs():
    handler = Recorder(fail_with=RuntimeError("boom"))
    batcher = make(handler, batch=3)
    tickets = [submit(batcher, i) for i in range(3)]
    outcomes = await asyncio.gather(*(t.future for t in tickets), return_exceptions=True)
    assert all(isinstance(o, InferenceFailed) for o in outcomes)
    handler.fail_with = None
    again = [submit(batcher, i) for i in range(3)]
    assert await asyncio.gather(*(t.future for t in again)) == [0, 10, 20]
    await batcher.close(timeout_s=1)


async def test_a_wrong_number_of_outputs_fails_the_batch():
    handler = Recorder()
    handler.wrong_length = True
    batcher = make(handler, batch=2)
    tickets = [submit(batcher, i) for i in range(2)]
    outcomes = await asyncio.gather(*(t.future for t in tickets), return_exceptions=True)
    assert all(isinstance(o, InferenceFailed) for o in outcomes)
    await batcher.close(timeout_s=1)


async def test_close_drains_admitted_work_and_refuses_new_work():
    handler = Recorder(gated=True)
    batcher = make(handler, batch=2, delay=FAR)
    tickets = [submit(batcher, i) for i in range(5)]
    closing = asyncio.create_task(batcher.close(timeout_s=5))
    await handler.entered.wait()
    with pytest.raises(ServiceUnavailable):
        batcher.admission.reserve(1)
    handler.gate.set()
    assert await closing == 0
    assert [t.future.result() for t in tickets] == [0, 10, 20, 30, 40]
    # A draining batcher does not wait out the delay window for the last partial batch.
    assert handler.batches == [[0, 1], [2, 3], [4]]


async def test_close_fails_what_cannot_finish_within_the_grace_period():
    handler = Recorder(gated=True)
    batcher = make(handler, batch=1, delay=0)
    running = submit(batcher, 1)
    queued = submit(batcher, 2)
    await handler.entered.wait()
    left = await batcher.close(timeout_s=0.01)
    assert left == 1
    with pytest.raises(ServiceUnavailable):
        await running.future
    with pytest.raises(ServiceUnavailable):
        await queued.future


def test_settings_are_checked_including_in_flight():
    with pytest.raises(ValueError, match="max_in_flight"):
        MicroBatcher(Recorder(), admission=Admission(1), max_batch_size=1, max_delay_s=0, max_in_flight=0)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(Recorder(), admission=Admission(1), max_batch_size=0, max_delay_s=0)


class BrokenObserver(Drops):
    def on_batch(self, size: int, queue_waits_s: Sequence[float]) -> None:
        raise RuntimeError("a metrics bug")

    def on_forward(self, duration_s: float, failed: bool) -> None:
        raise RuntimeError("a metrics bug")


async def test_a_failing_observer_never_leaves_a_caller_unanswered():
    batcher = make(Recorder(), batch=2, delay=0.0, observer=BrokenObserver())
    tickets = [submit(batcher, i) for i in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*(t.future for t in tickets)), 5)
    assert results == [0, 10, 20]
    assert batcher.healthy
    await batcher.close(timeout_s=1)


async def test_a_dead_collector_fails_its_callers_and_says_why(monkeypatch):
    failures: list[str] = []
    recorder = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(
        recorder, admission=Admission(10), max_batch_size=2, max_delay_s=0.0, on_failure=failures.append
    )

    def broken(loop: object) -> None:
        raise RuntimeError("a bug in the collector")

    monkeypatch.setattr(batcher, "_take_batch", broken)
    batcher.start()
    ticket = submit(batcher, 1)
    with pytest.raises(ServiceUnavailable, match="a bug in the collector"):
        await asyncio.wait_for(ticket.future, 5)
    assert not batcher.healthy
    assert failures and "a bug in the collector" in failures[0]
    with pytest.raises(ServiceUnavailable):
        submit(batcher, 2)
    await batcher.close(timeout_s=1)


async def test_close_keeps_a_cancellation_aimed_at_itself():
    """close() waits for cancelled batch tasks; a cancel of close() itself must still reach its caller."""
    cleanup = asyncio.Event()
    entered = asyncio.Event()

    async def stubborn(items: list[int]) -> list[int]:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await cleanup.wait()  # slow to stop, like a forward that must finish its step
            raise
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(stubborn, admission=Admission(4), max_batch_size=1, max_delay_s=0)
    batcher.start()
    submit(batcher, 1)
    await asyncio.wait_for(entered.wait(), 5)
    closing = asyncio.create_task(batcher.close(timeout_s=0))
    for _ in range(5):
        await asyncio.sleep(0)
    closing.cancel()
    cleanup.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(closing, 5)
    assert closing.cancelled()
