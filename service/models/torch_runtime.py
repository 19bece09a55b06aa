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
from service.models.runtimes import TORCH, RuntimeInfo, RuntimeOutputs, channel_constants, normalise, without_head

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
        multi_label: bool = False,
    ) -> None:
        """`multi_label`: per-class sigmoid scores (a multi-label head) instead of a softmax."""
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs were asked for, but the model runs on {device}")
        self.device = device
        self.dtype = dtype
        self.channels_last = channels_last
        self.cuda_graphs = cuda_graphs
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(device).to(memory_format=memory_format)
        fc = getattr(self.model, "fc", None)
        if not isinstance(fc, nn.Linear):
            raise ValueError("the model has no linear classifier `fc`")
        self._head: nn.Linear = fc
        self._num_classes = fc.out_features
        self._feature_dim = fc.in_features
        self._num_parameters = sum(p.numel() for p in self.model.parameters())
        # One pass gives both answers: the body up to the pooled features, then the head on them.
        self._body = without_head(self.model)
        self._compute: Callable[[torch.Tensor], torch.Tensor] = self._body
        if compile:
            # Static shapes: buckets give a handful of sizes, each compiled once during warm-up.
            self._compute = torch.compile(self._body, dynamic=False)
        self._mean, self._std = channel_constants(preprocessing, device)
        self._graphs: dict[int, GraphedForward[RuntimeOutputs]] = {}
        self._multi_label = multi_label

    @property
    def info(self) -> RuntimeInfo:
        return RuntimeInfo(TORCH, torch.__version__)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def num_parameters(self) -> int:
        return self._num_parameters

    @property
    def feature_dim(self) -> int:
        return self._feature_dim

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        return self.outputs(batch).probabilities

    @torch.inference_mode()
    def outputs(self, batch: torch.Tensor) -> RuntimeOutputs:
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
        self.outputs(batch)

    def _forward_split(self, batch: torch.Tensor) -> RuntimeOutputs:
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
        return RuntimeOutputs(torch.cat([p.probabilities for p in parts]), torch.cat([p.features for p in parts]))

    def _forward(self, batch: torch.Tensor) -> RuntimeOutputs:
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
            features = self._compute(x)
            logits = self._head(features)
        scores = torch.sigmoid(logits.float()) if self._multi_label else torch.softmax(logits.float(), dim=1)
        return RuntimeOutputs(scores, features.float())
