"""Every setting of the server, from CLI flags, `RESNET_SERVE_*` environment variables and defaults."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODELS = ("resnet18v1",)


class MissingWeightsPolicy(StrEnum):
    """What `serve` does when a model's weights file is absent."""

    FAIL = "fail"
    FETCH = "fetch"
    RANDOM = "random"
    FETCH_OR_RANDOM = "fetch-or-random"


class Settings(BaseSettings):
    """Server settings; `None` means "pick the default that suits the device" (see `resolved`)."""

    model_config = SettingsConfigDict(env_prefix="RESNET_SERVE_", extra="forbid", frozen=True)

    # NoDecode: the env var is a comma list (`resnet18v1,resnet50v1`), not JSON.
    models: Annotated[tuple[str, ...], Field(min_length=1), NoDecode] = DEFAULT_MODELS
    weights_dir: Path = Path("weights")
    missing_weights: MissingWeightsPolicy = MissingWeightsPolicy.FAIL
    random_seed: int = 0
    # Where `--missing-weights fetch` downloads from: download.pytorch.org/models/ or a mirror of it.
    weights_base_url: str = "https://download.pytorch.org/models/"
    host: str = "127.0.0.1"
    # Server processes on the one port, each with its own model copy (see service/supervisor.py).
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"

    max_batch_size: Annotated[int | None, Field(ge=1, le=1024)] = None
    # Sizes a batch is padded up to, e.g. `1,2,4,8`; `off` runs each batch at its own size. Default:
    # powers of two up to the max batch on a GPU (static shapes for CUDA graphs), off on a CPU (padding
    # would cost CPU time for nothing).
    batch_buckets: Annotated[tuple[int, ...] | None, NoDecode] = None
    cuda_graphs: bool | None = None
    # torch.compile each bucket at startup: slower to start; measure before turning it on.
    compile: bool = False
    # Decode JPEGs with their batch on the model's device (nvJPEG on CUDA) instead of in the decode
    # pool; the host still checks each header. Not bit-identical with the reference transform.
    decode_on_device: bool = False
    # Batches handed to the device at once: 2 on a GPU overlaps the next batch's copy with the forward.
    max_batches_in_flight: Annotated[int | None, Field(ge=1, le=8)] = None
    max_delay_ms: Annotated[float | None, Field(ge=0, le=10_000)] = None
    max_queue_size: Annotated[int | None, Field(ge=1, le=1_000_000)] = None
    request_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # A body that has not fully arrived by then is refused (408) and its queue slot freed.
    upload_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    max_upload_bytes: Annotated[int, Field(ge=1)] = 10 * 1024 * 1024
    max_header_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024
    max_image_pixels: Annotated[int, Field(ge=1)] = 50_000_000
    max_images_per_request: Annotated[int, Field(ge=1, le=4096)] = 64
    shutdown_grace_s: Annotated[float, Field(ge=0, le=3600)] = 30.0

    decode_workers: Annotated[int | None, Field(ge=1, le=256)] = None
    torch_threads: Annotated[int | None, Field(ge=1, le=1024)] = None
    channels_last: bool = True
    # fp32 by default: the correctness tests compare against an fp32 torchvision forward.
    dtype: Annotated[str, Field(pattern=r"^(float32|float16|bfloat16)$")] = "float32"
    access_log: bool = False
    log_level: Annotated[str, Field(pattern=r"^(debug|info|warning|error)$")] = "info"

    @field_validator("models", mode="before")
    @classmethod
    def _split_comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("batch_buckets", mode="before")
    @classmethod
    def _parse_buckets(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "auto":
                return None
            if text == "off":
                return ()
            return tuple(int(part) for part in text.split(",") if part.strip())
        return value

    @field_validator("batch_buckets")
    @classmethod
    def _buckets_are_sizes(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and any(size < 1 for size in value):
            raise ValueError("batch buckets are batch sizes, each at least 1")
        return tuple(sorted(set(value))) if value is not None else None

    def resolved(self, *, on_gpu: bool) -> Settings:
        """Fill every device-dependent default; an explicit value always wins."""
        # Threads are per process: with several workers, they share the cores.
        cores = max(1, (os.cpu_count() or 1) // self.workers)
        defaults: dict[str, object] = {
            # CPU: batches beyond 8 add latency without adding throughput; a GPU wants full batches.
            "max_batch_size": 64 if on_gpu else 8,
            "max_delay_ms": 5.0 if on_gpu else 2.0,
            "decode_workers": max(2, cores - 1) if on_gpu else max(1, cores),
            "torch_threads": max(1, min(4, cores)) if on_gpu else cores,
            "max_batches_in_flight": 2 if on_gpu else 1,
        }
        updates = {key: value for key, value in defaults.items() if getattr(self, key) is None}
        batch = updates.get("max_batch_size", self.max_batch_size)
        assert isinstance(batch, int)
        if self.max_queue_size is None:
            updates["max_queue_size"] = batch * 8
        buckets = self.batch_buckets
        if buckets is None:
            buckets = power_of_two_buckets(batch) if on_gpu else ()
            updates["batch_buckets"] = buckets
        if buckets and buckets[-1] < batch:
            raise ValueError(f"the largest batch bucket ({buckets[-1]}) is below the max batch size ({batch})")
        if self.cuda_graphs is None:
            updates["cuda_graphs"] = on_gpu and bool(buckets)
        elif self.cuda_graphs and not (on_gpu and buckets):
            raise ValueError("CUDA graphs need a CUDA device and batch buckets")
        return self.model_copy(update=updates)

    # Accessors for resolved settings, so callers need no `assert x is not None` each time.
    @property
    def batch_size(self) -> int:
        assert self.max_batch_size is not None, "call resolved() first"
        return self.max_batch_size

    @property
    def delay_s(self) -> float:
        assert self.max_delay_ms is not None, "call resolved() first"
        return self.max_delay_ms / 1000.0

    @property
    def buckets(self) -> tuple[int, ...]:
        assert self.batch_buckets is not None, "call resolved() first"
        return self.batch_buckets

    @property
    def in_flight(self) -> int:
        assert self.max_batches_in_flight is not None, "call resolved() first"
        return self.max_batches_in_flight

    @property
    def max_delay_s(self) -> float:
        return self.delay_s

    @property
    def queue_size(self) -> int:
        assert self.max_queue_size is not None, "call resolved() first"
        return self.max_queue_size


def power_of_two_buckets(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, ... and `max_batch_size` itself: at most 2x padding, about log2(n) shapes to warm."""
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


# TEMPORARY stand-in until the resolved plan lands.
ServerPlan = Settings
