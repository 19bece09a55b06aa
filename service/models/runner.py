"""One forward per batch on the device: uint8 images in, class probabilities out.

A batch goes through two steps, so that on a GPU they can overlap across batches:
`stage` stacks the images into (pinned) host memory and starts their copy to the device on a copy
stream; `run` has the runtime (torch or ONNX Runtime, see runtimes.py) compute once that copy is
done and brings the probabilities back. While batch N computes, batch N+1 is staged: its
host-to-device copy hides behind N's kernels.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Executor, Future
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from service.errors import InsufficientStorage, InvalidInput, ServeError
from service.imaging import EncodedJpeg, ModelInput, Preprocessing
from service.models.runtimes import Runtime
from service.models.torch_runtime import DTYPES, TorchRuntime

__all__ = ["DTYPES", "ExecutionPlan", "ImageResult", "ModelRunner", "Output", "Result", "StagedBatch", "pick_device"]

logger = logging.getLogger(__name__)


def decode_batch(
    encoded: Sequence[EncodedJpeg], spec: Preprocessing, device: torch.device
) -> list[torch.Tensor | InsufficientStorage | None]:
    """The device decoder, imported on first use: it needs torchvision, which costs about 165 MiB
    of RSS (its ops import torch._dynamo), and only `--decode-on-device` ever calls it."""
    from service.models.device_decode import decode_batch as decode_on_device

    return decode_on_device(encoded, spec, device)


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


# An image's class probabilities, or the error that failed it alone.
Output = torch.Tensor | ServeError


class ImageResult(NamedTuple):
    """One image's forward on the CPU: what /predict reads and what /embed reads."""

    probabilities: torch.Tensor  # (classes,)
    features: torch.Tensor  # (feature_dim,)


# An image's probabilities and features, or the error that failed it alone.
Result = ImageResult | ServeError


class ModelRunner:
    """Holds a model's runtime on its device. `stage` and `run` may be called from two different
    threads, but each from one thread at a time."""

    def __init__(
        self,
        runtime: Runtime,
        preprocessing: Preprocessing,
        *,
        device: torch.device,
        plan: ExecutionPlan | None = None,
        host_preprocess: Callable[[bytes], torch.Tensor] | None = None,
        fallback_executor: Executor | None = None,
    ) -> None:
        """`host_preprocess` decodes a JPEG the device decoder failed on (see `stage`); without
        it such an image fails alone. `fallback_executor` runs those host decodes side by side (the
        server's decode pool); without it they run one after another on the thread that stages.
        It must not be the executor that calls `stage`, which waits for them."""
        self.runtime = runtime
        self.device = device
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
        self._copy_stream: torch.cuda.Stream | None = None
        if self._on_cuda:
            self._copy_stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]

    @classmethod
    def with_torch(
        cls,
        model: nn.Module,
        preprocessing: Preprocessing,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
        plan: ExecutionPlan | None = None,
        host_preprocess: Callable[[bytes], torch.Tensor] | None = None,
        fallback_executor: Executor | None = None,
    ) -> ModelRunner:
        """A runner whose forward is `model` in torch (eager, compiled, or CUDA-graphed per `plan`)."""
        plan = plan or ExecutionPlan()
        runtime = TorchRuntime(
            model,
            preprocessing,
            device=device,
            dtype=dtype,
            channels_last=channels_last,
            cuda_graphs=plan.cuda_graphs,
            compile=plan.compile,
        )
        return cls(
            runtime,
            preprocessing,
            device=device,
            plan=plan,
            host_preprocess=host_preprocess,
            fallback_executor=fallback_executor,
        )

    def use_fallback_executor(self, executor: Executor) -> None:
        """Decode the JPEGs the device rejects on `executor` (the server's decode pool) from now on;
        never the executor that calls `stage`, which waits for these decodes."""
        self._fallback_executor = executor

    @property
    def num_classes(self) -> int:
        return self.runtime.num_classes

    @property
    def feature_dim(self) -> int:
        return self.runtime.feature_dim

    def predict(self, images: Sequence[ModelInput]) -> list[Output]:
        """Probabilities (float32, on the CPU) for each image, in order: a (3, H, W) uint8 tensor, or
        an `EncodedJpeg` to decode on the device."""
        return self.run(self.stage(images))

    def results(self, images: Sequence[ModelInput]) -> list[Result]:
        """`predict`, with each image's pooled features beside its probabilities."""
        return self.run_results(self.stage(images))

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

    def run(self, staged: StagedBatch) -> list[Output]:
        return [r if isinstance(r, ServeError) else r.probabilities for r in self.run_results(staged)]

    @torch.inference_mode()
    def run_results(self, staged: StagedBatch) -> list[Result]:
        outputs = self.runtime.outputs(self._ready(staged))
        # .cpu() waits for the device, so the caller's timing includes the whole forward.
        probabilities = outputs.probabilities[: staged.count].cpu().unbind(0)
        features = outputs.features[: staged.count].cpu().unbind(0)
        results: list[Result] = [ImageResult(p, f) for p, f in zip(probabilities, features, strict=True)]
        for index, error in staged.failures.items():
            results[index] = error
        return results

    def _ready(self, staged: StagedBatch) -> torch.Tensor:
        """The staged images, once their copy to the device is done (as seen from the compute stream)."""
        batch = staged.images
        if staged.copied is not None:
            compute_stream = torch.cuda.current_stream(self.device)
            compute_stream.wait_event(staged.copied)
            # The tensor was allocated on the copy stream; tell the allocator it is used here too.
            batch.record_stream(compute_stream)
        return batch

    def warm_up(self, batch_sizes: Sequence[int], *, jpeg: EncodedJpeg | None = None) -> None:
        """Run (and with CUDA graphs, capture) every bucket once, so no request pays for it; with a
        `jpeg`, start the device's JPEG decoder too."""
        sizes = set(self.plan.buckets) or set(batch_sizes)
        for size in sorted(sizes, reverse=True):  # the largest first: the memory peak shows at once
            blank = torch.zeros(3, self.crop_size, self.crop_size, dtype=torch.uint8)
            self.runtime.warm(self._ready(self.stage([blank] * size)))
        if jpeg is not None:
            self.predict([jpeg])
