"""One forward per batch on the device: uint8 images in, class probabilities out.

A batch goes through two steps, so that on a GPU they can overlap across batches:
`stage` stacks the images into (pinned) host memory and starts their copy to the device on a copy
stream; `run` computes on the compute stream once that copy is done and brings the probabilities back.
While batch N computes, batch N+1 is staged: its host-to-device copy hides behind N's kernels.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Executor, Future
from dataclasses import dataclass, field

import torch
from torch import nn

from service.errors import InsufficientStorage, InvalidInput, ServeError
from service.imaging import EncodedJpeg, ModelInput, Preprocessing
from service.models.cuda_graphs import GraphedForward
from service.models.device_decode import decode_batch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {requested} was asked for, but CUDA is not available here")
    return device


@dataclass(frozen=True)
class ExecutionPlan:
    """How batches run. `buckets`: the batch sizes a forward is padded up to (empty: each batch runs
    at its own size); `cuda_graphs`: one captured graph per bucket; `compile`: torch.compile first."""

    buckets: tuple[int, ...] = ()
    cuda_graphs: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if list(self.buckets) != sorted(set(self.buckets)) or any(size < 1 for size in self.buckets):
            raise ValueError(f"buckets must be distinct positive sizes in ascending order, got {self.buckets}")
        if self.cuda_graphs and not self.buckets:
            raise ValueError("CUDA graphs need batch buckets: a graph is captured for fixed shapes")

    def bucket_for(self, count: int) -> int:
        """The smallest bucket that holds `count` images; `count` itself without buckets."""
        for size in self.buckets:
            if size >= count:
                return size
        if self.buckets:
            raise ValueError(f"a batch of {count} is larger than the largest bucket ({self.buckets[-1]})")
        return count


@dataclass(frozen=True)
class StagedBatch:
    """A batch on its way to the device: `count` real images, padded to the bucket's size.
    `failures`: images that could not be decoded on the device nor on the host, by position."""

    count: int
    images: torch.Tensor
    copied: torch.cuda.Event | None = None
    failures: Mapping[int, ServeError] = field(default_factory=dict)


# An image's result: its class probabilities, or the error that failed it alone.
Output = torch.Tensor | ServeError


class ModelRunner:
    """Holds a model on its device. `stage` and `run` may be called from two different threads, but
    each from one thread at a time."""

    def __init__(
        self,
        model: nn.Module,
        preprocessing: Preprocessing,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
        plan: ExecutionPlan | None = None,
        host_preprocess: Callable[[bytes], torch.Tensor] | None = None,
        fallback_executor: Executor | None = None,
    ) -> None:
        """`host_preprocess` decodes a JPEG the device decoder failed on (see `stage`); without
        it such an image fails alone. `fallback_executor` runs those host decodes side by side (the
        server's decode pool); without it they run one after another on the thread that stages.
        It must not be the executor that calls `stage`, which waits for them."""
        self.device = device
        self.dtype = dtype
        self.channels_last = channels_last
        self.plan = plan or ExecutionPlan()
        self.preprocessing = preprocessing
        self.crop_size = preprocessing.crop_size
        self._host_preprocess = host_preprocess
        self._fallback_executor = fallback_executor
        self._on_cuda = device.type == "cuda"
        if self.plan.cuda_graphs and not self._on_cuda:
            raise ValueError(f"CUDA graphs were asked for, but the model runs on {device}")
        if self._on_cuda and self.plan.buckets:
            # A few fixed shapes, each warmed before serving: cuDNN can afford to time its algorithms.
            torch.backends.cudnn.benchmark = True
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(device).to(memory_format=memory_format)
        self._compute: Callable[[torch.Tensor], torch.Tensor] = self.model
        if self.plan.compile:
            # Static shapes: buckets give a handful of sizes, each compiled once during warm-up.
            self._compute = torch.compile(self.model, dynamic=False)
        # Normalising on the device keeps the host-to-device copy at one byte a sample.
        self._mean = torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1)
        self._copy_stream: torch.cuda.Stream | None = None
        if self._on_cuda:
            self._copy_stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        self._graphs: dict[int, GraphedForward] = {}

    @property
    def runtime(self) -> str:
        """What runs the forward, with its version, for /models (e.g. "torch 2.14.1")."""
        return f"torch {torch.__version__}"

    def use_fallback_executor(self, executor: Executor) -> None:
        """Decode the JPEGs the device rejects on `executor` (the server's decode pool) from now on;
        never the executor that calls `stage`, which waits for these decodes."""
        self._fallback_executor = executor

    @property
    def num_classes(self) -> int:
        fc = getattr(self.model, "fc", None)
        assert isinstance(fc, nn.Linear)
        return fc.out_features

    def predict(self, images: Sequence[ModelInput]) -> list[Output]:
        """Probabilities (float32, on the CPU) for each image, in order: a (3, H, W) uint8 tensor, or
        an `EncodedJpeg` to decode on the device."""
        return self.run(self.stage(images))

    def stage(self, images: Sequence[ModelInput]) -> StagedBatch:
        count = len(images)
        size = self.plan.bucket_for(count)
        encoded = {index: image for index, image in enumerate(images) if isinstance(image, EncodedJpeg)}
        blank = torch.zeros(3, self.crop_size, self.crop_size, dtype=torch.uint8)
        decoded = [blank if isinstance(image, EncodedJpeg) else image for image in images]
        # Pinned memory: the copy to the GPU can then run asynchronously, overlapping compute.
        host = torch.empty((size, *decoded[0].shape), dtype=torch.uint8, pin_memory=self._on_cuda)
        torch.stack(decoded, out=host[:count])
        if size > count:
            host[count:].zero_()  # padding rows: any values would do; zeros keep runs reproducible
        stream = torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else contextlib.nullcontext()
        with stream:
            on_device = host.to(self.device, non_blocking=True)
            failures = self._decode_into(on_device, encoded) if encoded else {}
            if self._copy_stream is None:
                return StagedBatch(count, on_device, failures=failures)
            copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            copied.record(self._copy_stream)
        return StagedBatch(count, on_device, copied, failures)

    def _decode_into(self, batch: torch.Tensor, encoded: dict[int, EncodedJpeg]) -> dict[int, ServeError]:
        """Decode the JPEGs on the device into their rows; one the device decoder rejects (a variant
        it lacks, or a damaged file) is decoded on the host, which alone decides it is bad."""
        failures: dict[int, ServeError] = {}
        rejected: dict[int, EncodedJpeg] = {}
        for (index, item), outcome in zip(
            encoded.items(), decode_batch(list(encoded.values()), self.preprocessing, self.device), strict=True
        ):
            if outcome is None:
                rejected[index] = item
            elif isinstance(outcome, ServeError):
                failures[index] = outcome
            else:
                batch[index].copy_(outcome, non_blocking=True)
        for index, image in self._decode_on_host(rejected).items():
            if isinstance(image, ServeError):
                failures[index] = image
            else:
                batch[index].copy_(image, non_blocking=True)
        return failures

    def _decode_on_host(self, rejected: Mapping[int, EncodedJpeg]) -> dict[int, torch.Tensor | ServeError]:
        """The host decodes of rejected JPEGs, all handed to the fallback executor at once: spread over
        its threads rather than one after another here, where they would hold up the model."""
        files = {index: item.data.numpy().tobytes() for index, item in rejected.items()}
        jobs: dict[int, Future[torch.Tensor | ServeError]] = {}
        if self._fallback_executor is not None:
            with contextlib.suppress(RuntimeError):  # the executor shut down (server stopping): decode here
                for index, data in files.items():
                    jobs[index] = self._fallback_executor.submit(self._decode_on_host_one, data)
        decoded: dict[int, torch.Tensor | ServeError] = {}
        for index, data in files.items():
            job = jobs.get(index)
            try:
                decoded[index] = job.result() if job is not None else self._decode_on_host_one(data)
            except CancelledError:  # cancelled by the executor's shutdown
                decoded[index] = self._decode_on_host_one(data)
        return decoded

    def _decode_on_host_one(self, data: bytes) -> torch.Tensor | ServeError:
        if self._host_preprocess is None:
            return InvalidInput("the JPEG could not be decoded")
        try:
            return self._host_preprocess(data)
        except ServeError as exc:
            return exc

    @torch.inference_mode()
    def run(self, staged: StagedBatch) -> list[Output]:
        batch = staged.images
        if staged.copied is not None:
            compute_stream = torch.cuda.current_stream(self.device)
            compute_stream.wait_event(staged.copied)
            # The tensor was allocated on the copy stream; tell the allocator it is used here too.
            batch.record_stream(compute_stream)
        try:
            probabilities = self._probabilities(batch)
        except torch.cuda.OutOfMemoryError:
            probabilities = self._forward_split(batch)
        # .cpu() waits for the device, so the caller's timing includes the whole forward.
        outputs: list[Output] = list(probabilities[: staged.count].cpu().unbind(0))
        for index, error in staged.failures.items():
            outputs[index] = error
        return outputs

    def warm_up(self, batch_sizes: Sequence[int], *, jpeg: EncodedJpeg | None = None) -> None:
        """Run (and with CUDA graphs, capture) every bucket once, so no request pays for it; with a
        `jpeg`, start the device's JPEG decoder too."""
        sizes = set(self.plan.buckets) or set(batch_sizes)
        for size in sorted(sizes, reverse=True):  # the largest first: the memory peak shows at once
            blank = torch.zeros(3, self.crop_size, self.crop_size, dtype=torch.uint8)
            staged = self.stage([blank] * size)
            if self.plan.cuda_graphs:
                self._capture(staged)
            self.run(staged)
        if jpeg is not None:
            self.predict([jpeg])

    def _capture(self, staged: StagedBatch) -> None:
        size = staged.images.shape[0]
        if staged.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(staged.copied)
        with torch.inference_mode():
            self._graphs[size] = GraphedForward(self._forward, staged.images)
        logger.debug("captured a CUDA graph for batch size %d", size)

    def _probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        graph = self._graphs.get(batch.shape[0])
        return graph(batch) if graph is not None else self._forward(batch)

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
        x = batch.to(torch.float32).div_(255)
        x.sub_(self._mean).div_(self._std)
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
