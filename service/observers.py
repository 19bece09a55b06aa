"""What admission and the batcher report as they work; the metrics module implements it.

A report must never break the work it describes: `GuardedObserver` turns an observer's exception
into one log line (per kind of call), so a metrics bug cannot leave a batch's callers unanswered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

logger = logging.getLogger(__name__)


class BatchObserver(Protocol):
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


class GuardedObserver:
    """Forwards every report to `inner`; an exception there is logged, never raised."""

    def __init__(self, inner: BatchObserver, name: str) -> None:
        self._inner = inner
        self._name = name
        self._failed: set[str] = set()

    def on_batch(self, size: int, queue_waits_s: Sequence[float]) -> None:
        self._call("on_batch", lambda: self._inner.on_batch(size, queue_waits_s))

    def on_forward(self, duration_s: float, failed: bool) -> None:
        self._call("on_forward", lambda: self._inner.on_forward(duration_s, failed))

    def on_dropped(self, reason: str, count: int) -> None:
        self._call("on_dropped", lambda: self._inner.on_dropped(reason, count))

    def on_depth(self, depth: int) -> None:
        self._call("on_depth", lambda: self._inner.on_depth(depth))

    def _call(self, kind: str, report: Callable[[], None]) -> None:
        try:
            report()
        except Exception:
            # Logged once per kind: a broken observer fails on every call, and the log must stay readable.
            if kind not in self._failed:
                self._failed.add(kind)
                logger.exception("%s: the metrics observer failed in %s; serving goes on", self._name, kind)
