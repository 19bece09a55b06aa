"""The torch runtime: eager (or compiled) PyTorch, with one CUDA graph per batch bucket on a GPU.

On CUDA this is the default: buckets, captured graphs and two batches in flight keep the GPU busy,
and autocast gives fp16/bf16. On a CPU, ONNX Runtime is faster (docs/benchmarks.md), and this
runtime remains the reference and the fallback (`--runtime torch`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from torch import nn

from service.errors import InsufficientStorage
from service.imaging import Preprocessing
from service.models.cuda_graphs import GraphedForward
from service.models.runtimes import TORCH, RuntimeInfo, channel_constants, normalise

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchRuntime:
    def __init__(
        self,
        model: nn.Module,
        preprocessing: Preprocessing,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
        cuda_graphs: bool = False,
        compile: bool = False,
    ) -> None:
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs were asked for, but the model runs on {device}")
        self.device = device
        self.dtype = dtype
        self.channels_last = channels_last
        self.cuda_graphs = cuda_graphs
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(device).to(memory_format=memory_format)
        self._compute: Callable[[torch.Tensor], torch.Tensor] = self.model
        if compile:
            # Static shapes: buckets give a handful of sizes, each compiled once during warm-up.
            self._compute = torch.compile(self.model, dynamic=False)
        self._mean, self._std = channel_constants(preprocessing, device)
        self._graphs: dict[int, GraphedForward] = {}
        fc = getattr(self.model, "fc", None)
        if not isinstance(fc, nn.Linear):
            raise ValueError("the model has no linear classifier `fc`")
        self._num_classes = fc.out_features
        self._num_parameters = sum(p.numel() for p in self.model.parameters())

    @property
    def info(self) -> RuntimeInfo:
        return RuntimeInfo(TORCH, torch.__version__)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def num_parameters(self) -> int:
        return self._num_parameters

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        graph = self._graphs.get(batch.shape[0])
        try:
            return graph(batch) if graph is not None else self._forward(batch)
        except torch.cuda.OutOfMemoryError:
            return self._forward_split(batch)

    def warm(self, batch: torch.Tensor) -> None:
        if self.cuda_graphs:
            with torch.inference_mode():
                self._graphs[batch.shape[0]] = GraphedForward(self._forward, batch)
            logger.debug("captured a CUDA graph for batch size %d", batch.shape[0])
        self.probabilities(batch)

    def _forward_split(self, batch: torch.Tensor) -> torch.Tensor:
        """On CUDA out-of-memory, retry in halves; a single image that still fails is a 507."""
        torch.cuda.empty_cache()
        if batch.shape[0] == 1:
            raise InsufficientStorage("the GPU is out of memory even for a single image")
        logger.warning("CUDA out of memory on a batch of %d; retrying in halves", batch.shape[0])
        halves = torch.split(batch, (batch.shape[0] + 1) // 2)
        parts = []
        for half in halves:
            try:
                parts.append(self._forward(half))
            except torch.cuda.OutOfMemoryError:
                parts.append(self._forward_split(half))
        return torch.cat(parts)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = normalise(batch, self._mean, self._std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # No autocast weight cache: a CUDA graph must not capture casts that live outside it.
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.dtype, cache_enabled=False)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        with autocast:
            logits = self._compute(x)
        return torch.softmax(logits.float(), dim=1)
