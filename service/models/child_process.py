"""One-off work the server must not keep the memory of: run in a spawned child process.

Building a torchvision model imports torchvision, whose ops import torch._dynamo and sympy: about
165 MiB of RSS that a server on ONNX Runtime, which needs none of it to serve, would hold for good
after a one-off ONNX export or the writing of a random-init checkpoint. A child holds it, and exits.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def run_in_child(function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`function(*args, **kwargs)` in a spawned process (never forked: the parent's thread pools
    would not survive a fork); its exceptions, StartupError's one line included, are raised here.
    `function` and its arguments must pickle: a module-level function, plain data."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args, **kwargs).result()
