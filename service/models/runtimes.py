"""What computes a model's forward: torch or ONNX Runtime, behind one interface.

The runner stages uint8 batches on the device and hands each to a `Runtime`, which returns class
probabilities on the same device. Nothing above the runner knows which runtime it is: the batcher,
the engine and the API see the same stage/run split either way (design.md: "a runtime is a detail
of models/").
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import nn

from service.imaging import Preprocessing

TORCH = "torch"
ONNXRUNTIME = "onnxruntime"
RUNTIMES = (TORCH, ONNXRUNTIME)


@dataclass(frozen=True)
class RuntimeInfo:
    """For /models and the model_info metric: what runs the forward, and from which file.

    `file` is the model file the runtime executes (an exported or given .onnx) with its sha256;
    torch runs the module built from the weights file, so it has none of its own."""

    name: str
    version: str
    file: Path | None = None
    file_sha256: str | None = None
    providers: tuple[str, ...] = ()
    quantization: str = "none"

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


class RuntimeOutputs(NamedTuple):
    """A batch's forward: what /predict reads and what /embed reads, from one pass."""

    probabilities: torch.Tensor  # (N, classes) float32
    features: torch.Tensor  # (N, feature_dim) float32: the pooled features the classifier head reads


class Runtime(Protocol):
    """One model on one device. `probabilities` may run on one thread at a time."""

    @property
    def info(self) -> RuntimeInfo: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def num_parameters(self) -> int: ...

    @property
    def feature_dim(self) -> int: ...

    def outputs(self, batch: torch.Tensor) -> RuntimeOutputs:
        """(N, 3, H, W) uint8 on the runtime's device → probabilities and pooled features there."""
        ...

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """`outputs(batch).probabilities`."""
        ...

    def warm(self, batch: torch.Tensor) -> None:
        """Run `batch`'s shape once before serving (and capture it, where the runtime captures)."""
        ...


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def normalise(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → float32 standardised as the model was trained: the one place both runtimes
    do it, so that they see bit-identical inputs. Done where the batch is, after the copy, which
    keeps the host-to-device copy at one byte a sample."""
    x = batch.to(torch.float32).div_(255)
    return x.sub_(mean).div_(std)


def channel_constants(preprocessing: Preprocessing, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1)
    return mean, std


def without_head(model: nn.Module) -> nn.Module:
    """`model` with its classifier head replaced by an identity: what it returns is the pooled
    features the head reads. Every served architecture keeps its head in `fc` and applies it last,
    as torchvision's ResNet does. A shallow copy: the layers (and their weights) are shared, and
    `model` itself keeps its head."""
    body = copy.copy(model)
    body._modules = dict(model._modules)
    body.fc = nn.Identity()
    return body
