"""From a torch module (or an ONNX file) to a runner: the runtime the plan asks for, on the device.

Shared by the catalog's models (registry.py) and the files given as NAME=PATH (families/).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from service.config import ServerPlan
from service.imaging import Preprocessing, preprocess
from service.models.runner import ExecutionPlan, ModelRunner
from service.models.runtimes import Runtime
from service.models.torch_runtime import DTYPES, TorchRuntime


def torch_runtime(
    module: nn.Module, preprocessing: Preprocessing, settings: ServerPlan, device: torch.device, *, multi_label: bool
) -> TorchRuntime:
    return TorchRuntime(
        module,
        preprocessing,
        device=device,
        dtype=DTYPES[settings.dtype],
        channels_last=settings.channels_last,
        cuda_graphs=settings.cuda_graphs,
        compile=settings.compile,
        multi_label=multi_label,
    )


def make_runner(
    runtime: Runtime, preprocessing: Preprocessing, settings: ServerPlan, device: torch.device
) -> ModelRunner:
    host_preprocess: Callable[[bytes], torch.Tensor] = functools.partial(
        preprocess, spec=preprocessing, max_pixels=settings.max_image_pixels
    )
    return ModelRunner(
        runtime,
        preprocessing,
        device=device,
        plan=ExecutionPlan(buckets=settings.batch_buckets, cuda_graphs=settings.cuda_graphs, compile=settings.compile),
        host_preprocess=host_preprocess,
    )
