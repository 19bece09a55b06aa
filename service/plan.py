"""The settings the server runs with, once resolved (`ServerPlan`), and the choices they name.

config.py turns what the operator wrote into this plan; everything else reads only the plan.
"""

from __future__ import annotations

import dataclasses
import os
from enum import StrEnum
from pathlib import Path


class MissingWeightsPolicy(StrEnum):
    """What `serve` does when a model's weights file is absent."""

    FAIL = "fail"
    FETCH = "fetch"
    RANDOM = "random"
    FETCH_OR_RANDOM = "fetch-or-random"


class RuntimeChoice(StrEnum):
    """What computes the forward (service/models/runtimes.py)."""

    AUTO = "auto"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"


class Quantization(StrEnum):
    OFF = "off"
    INT8 = "int8"


def default_onnx_cache_dir() -> Path:
    """$XDG_CACHE_HOME/resnet-serve/onnx (~/.cache/... without it): writable by the user who serves,
    and apart from the weights directory, which may be mounted read-only."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "resnet-serve" / "onnx"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ServerPlan:
    """The settings the server runs with: the same names as `Settings`, nothing left to choose."""

    models: tuple[str, ...]
    weights_dir: Path
    missing_weights: MissingWeightsPolicy
    random_seed: int
    weights_base_url: str
    host: str
    port: int
    workers: int
    device: str
    runtime: RuntimeChoice  # never AUTO: torch or onnxruntime
    onnx_cache_dir: Path
    quantize: Quantization
    calibration_images: Path | None
    max_batch_size: int
    batch_buckets: tuple[int, ...]
    cuda_graphs: bool
    compile: bool
    decode_on_device: bool
    max_batches_in_flight: int
    max_delay_ms: float
    max_queue_size: int
    request_timeout_s: float
    upload_timeout_s: float
    head_timeout_s: float
    max_connections: int
    max_upload_bytes: int
    max_header_bytes: int
    max_image_pixels: int
    max_images_per_request: int
    shutdown_grace_s: float
    decode_workers: int
    torch_threads: int
    channels_last: bool
    dtype: str
    access_log: bool
    log_level: str
    grafana_url: str  # "": no link

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000.0


def power_of_two_buckets(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, ... and `max_batch_size` itself: at most 2x padding, about log2(n) shapes to warm."""
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))
