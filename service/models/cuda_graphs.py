"""One CUDA graph per batch bucket: the whole forward replayed as a single launch.

At batch 64 a ResNet forward is a few hundred kernels; launching them one by one from Python costs
milliseconds of CPU per batch, which on a fast GPU is as long as the forward itself. A captured graph
replays them with one call. The price is static shapes and static memory: each bucket gets its own
input buffer, output buffer and memory pool, captured once at startup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch

# Warm-up passes on a side stream before capture, as PyTorch's docs prescribe: they let cuDNN pick
# its algorithms and the caching allocator settle, so nothing is allocated lazily during capture.
_WARMUP_PASSES = 3

Output = TypeVar("Output")  # a tensor, or a tuple of tensors: whatever the forward returns


class GraphedForward(Generic[Output]):
    """`forward` captured for one input shape. Not thread-safe; the output is overwritten by the
    next replay, so the caller copies what it needs before calling again."""

    def __init__(self, forward: Callable[[torch.Tensor], Output], example: torch.Tensor) -> None:
        if example.device.type != "cuda":
            raise ValueError("CUDA graphs need an input on a CUDA device")
        self._input = example.clone()
        side = torch.cuda.Stream(device=example.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_PASSES):
                forward(self._input)
        torch.cuda.current_stream(example.device).wait_stream(side)
        # Each graph keeps a private pool: buckets replay in any order, and a shared pool is only
        # safe when graphs replay in the order they were captured.
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._output = forward(self._input)

    @property
    def batch_size(self) -> int:
        return int(self._input.shape[0])

    def __call__(self, batch: torch.Tensor) -> Output:
        if batch.shape != self._input.shape:
            raise ValueError(f"this graph was captured for {tuple(self._input.shape)}, got {tuple(batch.shape)}")
        # A copy on the current stream, so it is ordered after the previous replay's reads.
        self._input.copy_(batch, non_blocking=True)
        self._graph.replay()
        return self._output
