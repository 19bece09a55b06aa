"""Every setting of the server, from CLI flags, `RESNET_SERVE_*` environment variables and defaults.

`Settings` is what the operator wrote (`None`: "pick what suits the device"); the `serve` flags and
their help are generated from its fields (see service/cli.py). `Settings.resolve` turns it into the
`ServerPlan` the server runs with: every default filled in, every cross-field rule checked here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service import cores
from service.plan import (
    MissingWeightsPolicy,
    Quantization,
    RuntimeChoice,
    ServerPlan,
    default_onnx_cache_dir,
    power_of_two_buckets,
)

__all__ = ["MissingWeightsPolicy", "Quantization", "RuntimeChoice", "ServerPlan", "Settings", "power_of_two_buckets"]

DEFAULT_MODELS = ("resnet18v1",)
DEFAULT_MAX_IMAGES_PER_REQUEST = 64


class Settings(BaseSettings):
    """Run the HTTP server. Every flag is also RESNET_SERVE_<NAME> in the environment; a flag wins."""

    model_config = SettingsConfigDict(env_prefix="RESNET_SERVE_", extra="forbid", frozen=True)

    # NoDecode: the env var is a comma list (`resnet18v1,resnet50v1`), not JSON.
    models: Annotated[
        tuple[str, ...],
        Field(
            min_length=1,
            description="comma-separated models: catalog names (resnet18v1) or files as NAME=PATH[#preset]",
        ),
        NoDecode,
    ] = DEFAULT_MODELS
    weights_dir: Annotated[Path, Field(description="directory holding the weights files")] = Path("weights")
    missing_weights: Annotated[
        MissingWeightsPolicy,
        Field(description="when a model has no weights file: fail, fetch, random or fetch-or-random"),
    ] = MissingWeightsPolicy.FAIL
    random_seed: Annotated[int, Field(description="seed of generated random-init weights")] = 0
    weights_base_url: Annotated[
        str, Field(description="where --missing-weights fetch downloads from: download.pytorch.org/models/ or a mirror")
    ] = "https://download.pytorch.org/models/"
    host: Annotated[str, Field(description="address to bind")] = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535, description="port to bind")] = 8080
    workers: Annotated[
        int,
        Field(ge=1, le=64, description="server processes on the port, each with its own model copy"),
    ] = 1
    device: Annotated[
        str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto (CUDA when available), cpu, cuda or cuda:N")
    ] = "auto"

    runtime: Annotated[
        RuntimeChoice,
        Field(
            description="what computes the forward: torch, onnxruntime, or auto (onnxruntime on CPU, where it is "
            "1.4-1.9x faster; torch with CUDA graphs on GPU)"
        ),
    ] = RuntimeChoice.AUTO
    onnx_cache_dir: Annotated[
        Path | None,
        Field(
            description="where the ONNX files exported from the weights are kept between starts (onnxruntime); "
            "None: $XDG_CACHE_HOME/resnet-serve/onnx, else ~/.cache/resnet-serve/onnx"
        ),
    ] = None
    quantize: Annotated[
        Quantization,
        Field(
            description="int8: ONNX Runtime static quantisation, calibrated on --calibration-images (onnxruntime "
            "only; faster, less accurate: see the README); off: float32"
        ),
    ] = Quantization.OFF
    calibration_images: Annotated[
        Path | None,
        Field(description="a directory of photos (JPEG/PNG) like the ones served, to calibrate --quantize int8 on"),
    ] = None

    max_batch_size: Annotated[
        int | None, Field(ge=1, le=1024, description="images per forward at most; None: 8 on CPU, 64 on GPU")
    ] = None
    # The env var and flag take `1,2,4,8`, `off` or `auto`, not JSON.
    batch_buckets: Annotated[
        tuple[int, ...] | None,
        Field(
            description="sizes a batch is padded up to, e.g. 1,2,4,8, or off (each batch at its own size); "
            "None or auto: powers of 2 up to the max batch on GPU (static shapes), off on CPU (where padding "
            "costs CPU time for nothing)"
        ),
        NoDecode,
    ] = None
    cuda_graphs: Annotated[
        bool | None,
        Field(description="capture one CUDA graph per batch bucket at startup; None: on with CUDA and buckets"),
    ] = None
    compile: Annotated[
        bool,
        Field(description="torch.compile the model, one shape per bucket, at startup: slower to start; measure first"),
    ] = False
    decode_on_device: Annotated[
        bool,
        Field(
            description="decode JPEGs in their batch on the model's device (nvJPEG) instead of in the decode pool; "
            "not bit-identical with the reference transform"
        ),
    ] = False
    max_batches_in_flight: Annotated[
        int | None,
        Field(
            ge=1,
            le=8,
            description="batches handed to the device at once; 2 overlaps the next batch's copy with the forward; "
            "None: 2 on GPU, 1 on CPU",
        ),
    ] = None
    max_delay_ms: Annotated[
        float | None,
        Field(ge=0, le=10_000, description="how long a batch waits to fill; None: 2 on CPU, 5 on GPU"),
    ] = None
    max_queue_size: Annotated[
        int | None,
        Field(
            ge=1,
            le=1_000_000,
            description="admitted images waiting per model, beyond which 429; "
            "None: 8 x the max batch, and at least an explicit --max-images-per-request",
        ),
    ] = None
    request_timeout_s: Annotated[
        float, Field(gt=0, le=3600, description="deadline of a request from its arrival; then 504")
    ] = 30.0
    upload_timeout_s: Annotated[
        float, Field(gt=0, le=3600, description="time for a body to arrive; then 408 and its queue slot is freed")
    ] = 10.0
    # A legitimate client sends its head in one write; 10 s leaves room for a slow mobile link and
    # sits between uvicorn's 5 s keep-alive and nginx's 60 s client_header_timeout, while a client
    # trickling a header byte by byte (slowloris) loses its connection within seconds, not never.
    head_timeout_s: Annotated[
        float,
        Field(gt=0, le=3600, description="time for a request's line and headers to arrive; then the connection closes"),
    ] = 10.0
    max_connections: Annotated[
        int,
        Field(
            ge=0,
            description="open connections at most (uvicorn's limit_concurrency); beyond it 503; 0: no cap. "
            "Keep it under the open-file limit (ulimit -n)",
        ),
    ] = 2048
    max_upload_bytes: Annotated[int, Field(ge=1, description="body size cap; then 413")] = 10 * 1024 * 1024
    max_header_bytes: Annotated[
        int, Field(ge=1024, description="request line + headers cap; then 431 and the connection closes")
    ] = 64 * 1024
    max_image_pixels: Annotated[int, Field(ge=1, description="pixel cap, checked before decoding; then 400")] = (
        50_000_000
    )
    max_images_per_request: Annotated[
        int | None,
        Field(
            ge=1,
            le=4096,
            description="data parts in one request, at most --max-queue-size (a bigger request could never be "
            "admitted); None: 64, or the queue size if smaller",
        ),
    ] = None
    shutdown_grace_s: Annotated[
        float,
        Field(ge=0, le=3600, description="time to finish admitted work after SIGTERM; 0 cancels it at once"),
    ] = 30.0

    decode_workers: Annotated[
        int | None,
        Field(ge=1, le=256, description="threads decoding images; None: the usable CPUs (GPU: less 1), per worker"),
    ] = None
    torch_threads: Annotated[
        int | None,
        Field(
            ge=1,
            le=1024,
            description="intra-op threads of the forward (torch or onnxruntime); None: the usable CPUs "
            "(GPU: 4 at most), per worker",
        ),
    ] = None
    channels_last: Annotated[bool, Field(description="channels_last memory format for the forward")] = True
    # fp32 by default: the correctness tests compare against an fp32 torchvision forward.
    dtype: Annotated[
        str,
        Field(pattern=r"^(float32|float16|bfloat16)$", description="float32, or float16 / bfloat16 autocast (GPU)"),
    ] = "float32"
    access_log: Annotated[bool, Field(description="uvicorn's log line for each request")] = False
    log_level: Annotated[
        str, Field(pattern=r"^(debug|info|warning|error)$", description="debug, info, warning or error")
    ] = "info"
    # Only http(s): the page puts it in a link, where a javascript: URL would run in its origin.
    grafana_url: Annotated[
        str | None,
        Field(pattern=r"^https?://\S+$", description="Grafana's address, linked from the page at /; None: no link"),
    ] = None

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

    def resolve(self, *, on_gpu: bool) -> ServerPlan:
        """The plan to run: every device-dependent default filled in (an explicit value always wins)
        and every rule between settings checked. Raises ValueError with one line naming the flags."""
        # Threads are per process: with several workers, they share the CPUs this process may use.
        cpus = max(1, cores.usable_cpus() // self.workers)
        # CPU: batches beyond 8 add latency without adding throughput; a GPU wants full batches.
        batch = self.max_batch_size or (64 if on_gpu else 8)
        buckets = self.batch_buckets
        if buckets is None:
            buckets = power_of_two_buckets(batch) if on_gpu else ()
        if buckets and buckets[-1] < batch:
            raise ValueError(
                f"--batch-buckets: the largest batch bucket ({buckets[-1]}) is below the max batch size ({batch}); "
                "add a bucket of at least --max-batch-size, or lower --max-batch-size"
            )
        runtime = self._resolve_runtime(on_gpu=on_gpu)
        torch_runs = runtime is RuntimeChoice.TORCH
        cuda_graphs = self.cuda_graphs if self.cuda_graphs is not None else on_gpu and bool(buckets) and torch_runs
        if cuda_graphs and not (on_gpu and buckets):
            raise ValueError("--cuda-graphs: CUDA graphs need a CUDA device and batch buckets; use --no-cuda-graphs")
        # A request is admitted whole or not at all, so the queue must hold the largest one: each
        # default gives way to the other, and only two explicit values can disagree.
        queue = self.max_queue_size or max(batch * 8, self.max_images_per_request or 0)
        images = self.max_images_per_request or min(DEFAULT_MAX_IMAGES_PER_REQUEST, queue)
        if images > queue:
            raise ValueError(
                f"--max-images-per-request ({images}) is larger than --max-queue-size ({queue}): a request "
                "that big could never be admitted; raise --max-queue-size or lower --max-images-per-request"
            )
        resolved: dict[str, object] = {
            "runtime": runtime,
            "onnx_cache_dir": self.onnx_cache_dir or default_onnx_cache_dir(),
            "max_batch_size": batch,
            "max_delay_ms": self.max_delay_ms if self.max_delay_ms is not None else (5.0 if on_gpu else 2.0),
            "batch_buckets": buckets,
            "cuda_graphs": cuda_graphs,
            "max_batches_in_flight": self.max_batches_in_flight or (2 if on_gpu else 1),
            "max_queue_size": queue,
            "max_images_per_request": images,
            "decode_workers": self.decode_workers or (max(2, cpus - 1) if on_gpu else cpus),
            "torch_threads": self.torch_threads or (min(4, cpus) if on_gpu else cpus),
            "grafana_url": self.grafana_url or "",
        }
        given = {name: getattr(self, name) for name in type(self).model_fields if name not in resolved}
        return ServerPlan(**given, **resolved)  # type: ignore[arg-type]

    def _resolve_runtime(self, *, on_gpu: bool) -> RuntimeChoice:
        runtime = self.runtime
        torch_only = [
            (self.compile, "--compile"),
            (self.cuda_graphs is True, "--cuda-graphs"),
            (self.dtype != "float32", f"--dtype {self.dtype}"),
        ]
        if runtime is RuntimeChoice.AUTO:
            # On a GPU, torch's CUDA graphs win; on a CPU, onnxruntime, when it is installed (it is a
            # dependency: only a trimmed install lacks it). A torch-only flag asks for torch.
            onnx = not on_gpu and importlib.util.find_spec("onnxruntime") is not None
            wants_torch = any(given for given, _ in torch_only) and self.quantize is Quantization.OFF
            runtime = RuntimeChoice.ONNXRUNTIME if onnx and not wants_torch else RuntimeChoice.TORCH
        if runtime is RuntimeChoice.ONNXRUNTIME:
            for given, flag in torch_only:
                if given:
                    raise ValueError(f"{flag} is for --runtime torch, and the runtime is onnxruntime; drop {flag} "
                                     "or add --runtime torch")  # fmt: skip
        if self.quantize is Quantization.INT8:
            if runtime is not RuntimeChoice.ONNXRUNTIME:
                raise ValueError("--quantize int8 needs --runtime onnxruntime (ONNX Runtime's quantisation)")
            if self.calibration_images is None:
                raise ValueError("--quantize int8 needs --calibration-images DIR: photos like the ones served")
        return runtime
