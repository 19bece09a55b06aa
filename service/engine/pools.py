"""The threads a server works on: decoding uploads, staging batches, and the forward."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from service import cores
from service.config import ServerPlan


class Pools:
    def __init__(self, plan: ServerPlan) -> None:
        # Compute threads yield to the event loop (cores.lower_thread_priority): under overload the
        # loop must still refuse quickly.
        compute = cores.lower_thread_priority
        self.decode = ThreadPoolExecutor(
            max_workers=plan.decode_workers, thread_name_prefix="decode", initializer=compute
        )
        # One forward at a time per device: concurrent forwards only fight over the same cores.
        self.forward = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward", initializer=compute)
        # With more than one batch in flight, staging (stack, pin, copy to the device) gets its own
        # thread so it overlaps the forward; with one, a second thread would only add a hand-off.
        self.stage = self.forward
        self.forwards = 0  # batches run so far: what the engine's memory trimmer watches
        if plan.max_batches_in_flight > 1:
            self.stage = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage", initializer=compute)

    async def close(self) -> None:
        self.decode.shutdown(wait=False, cancel_futures=True)
        if self.stage is not self.forward:
            self.stage.shutdown(wait=False, cancel_futures=True)
        # A forward still running must finish before the process exits; wait off the loop.
        await asyncio.to_thread(self.forward.shutdown, wait=True, cancel_futures=True)
