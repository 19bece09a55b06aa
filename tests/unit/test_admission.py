"""Admission: slots before the body, growth once admitted, fairness for many-image requests."""

from __future__ import annotations

import asyncio

import pytest

from service.admission import Admission
from service.errors import DeadlineExceeded, InvalidInput, QueueFull, ServiceUnavailable

FAR = 1e9


def later(seconds: float = FAR) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_an_admitted_request_grows_while_the_server_drains():
    admission = Admission(8)
    reservation = admission.reserve(1)
    admission.stop_admitting()
    with pytest.raises(ServiceUnavailable):
        admission.reserve(1)
    await reservation.grow_to(3, deadline=later())
    assert (reservation.held, admission.in_use) == (3, 3)
    reservation.release()
    assert admission.in_use == 0


async def test_a_request_larger_than_the_queue_is_refused_with_a_4xx_that_is_not_429():
    admission = Admission(4)
    reservation = admission.reserve(1)
    with pytest.raises(InvalidInput, match="cannot fit") as refused:
        await reservation.grow_to(5, deadline=later())
    assert refused.value.status == 400
    with pytest.raises(InvalidInput):
        admission.reserve(5)


async def test_a_growth_waits_ahead_of_new_requests_until_room_frees():
    """Steady single-image load cannot starve a many-image request: once it waits for room, new
    requests are refused until it is served."""
    admission = Admission(4)
    singles = [admission.reserve(1) for _ in range(3)]
    big = admission.reserve(1)
    growing = asyncio.create_task(big.grow_to(3, deadline=later()))
    await asyncio.sleep(0)
    assert not growing.done()
    singles[0].release()  # one slot frees; a new single would fit, but the waiting growth comes first
    with pytest.raises(QueueFull):
        admission.reserve(1)
    assert not growing.done()
    singles[1].release()
    await asyncio.wait_for(growing, 5)
    assert (big.held, admission.in_use) == (3, 4)
    singles[2].release()
    big.release()
    assert admission.in_use == 0
    admission.reserve(1).release()  # new requests are admitted again


async def test_a_growth_that_times_out_gives_its_place_and_leaks_no_slot():
    admission = Admission(2)
    hog = admission.reserve(1)
    big = admission.reserve(1)
    with pytest.raises(DeadlineExceeded):
        await big.grow_to(2, deadline=later(0.01))
    assert admission.in_use == 2  # the two slots held before, nothing more
    hog.release()
    big.release()
    assert admission.in_use == 0
    admission.reserve(2).release()


async def test_a_cancelled_growth_leaks_no_slot_and_lets_the_next_one_through():
    admission = Admission(3)
    hog = admission.reserve(1)
    first = admission.reserve(1)
    second = admission.reserve(1)
    waiting_first = asyncio.create_task(first.grow_to(3, deadline=later()))
    await asyncio.sleep(0)
    waiting_second = asyncio.create_task(second.grow_to(2, deadline=later()))
    await asyncio.sleep(0)
    waiting_first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting_first
    first.release()  # the request gave up: its one slot comes back, and the second growth fits
    await asyncio.wait_for(waiting_second, 5)
    assert admission.in_use == 3
    for reservation in (hog, second):
        reservation.release()
    assert admission.in_use == 0
