"""glibc heap hygiene for a long-running server: few malloc arenas, and freed memory given back.

Decoding threads, the forward thread and OpenMP workers all allocate image- and activation-sized
buffers. With glibc's defaults that fragments across per-thread arenas into RSS steps that never come
back (+8.3 % over a 20,000-request soak; see docs/reliability.md). Both calls are no-ops where the C
library is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

_M_ARENA_MAX = -8  # from glibc's malloc.h


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def limit_arenas(arenas: int = 2) -> None:
    """Cap malloc arenas before the server's threads start; an explicit MALLOC_ARENA_MAX wins."""
    libc = _libc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return
    with contextlib.suppress(AttributeError):
        libc.mallopt(_M_ARENA_MAX, arenas)


def give_back_free_memory() -> bool:
    """Return free heap pages to the OS (malloc_trim(0)); True when glibc released any."""
    libc = _libc()
    if libc is None:
        return False
    try:
        return bool(libc.malloc_trim(0))
    except AttributeError:
        return False
