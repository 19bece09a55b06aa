"""One forward per batch on the device: uint8 images in, class probabilities out."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch
from torch import nn

from service.errors import InsufficientStorage
from service.imaging import Preprocessing

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {requested} was asked for, but CUDA is not available here")
    return device


class ModelRunner:
    """Holds a model on its device. Not thread-safe: the caller runs one forward at a time."""

    def __init__(
        self,
        model: nn.Module,
        preprocessing: Preprocessing,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.channels_last = channels_last
        self.crop_size = preprocessing.crop_size
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(device).to(memory_format=memory_format)
        # Normalising on the device keeps the host-to-device copy at one byte a sample.
        self._mean = torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1)
        self._on_cuda = device.type == "cuda"

    @property
    def num_classes(self) -> int:
        fc = getattr(self.model, "fc", None)
        assert isinstance(fc, nn.Linear)
        return fc.out_features

    def predict(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Probabilities (float32, on the CPU) for each (3, H, W) uint8 image, in order."""
        batch = torch.stack(list(images))
        try:
            probabilities = self._forward(batch)
        except torch.cuda.OutOfMemoryError:
            probabilities = self._forward_split(batch)
        return list(probabilities.unbind(0))

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

    @torch.inference_mode()
    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self._on_cuda:
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        x = batch.to(torch.float32).div_(255)
        x.sub_(self._mean).div_(self._std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        with autocast:
            logits = self.model(x)
        probabilities = torch.softmax(logits.float(), dim=1)
        # .cpu() waits for the device, so the caller's timing includes the whole forward.
        return probabilities.cpu()

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        for size in sorted(set(batch_sizes)):
            blank = torch.zeros(3, self.crop_size, self.crop_size, dtype=torch.uint8)
            self.predict([blank] * size)
