"""Probabilities to the top-k classes with their labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ClassScore:
    label: str
    probability: float


def top_k(probabilities: torch.Tensor, labels: Sequence[str], k: int) -> list[ClassScore]:
    """The k most probable classes of one image, most probable first."""
    if probabilities.ndim != 1 or probabilities.numel() != len(labels):
        raise ValueError(f"expected {len(labels)} probabilities, got shape {tuple(probabilities.shape)}")
    values, indices = torch.topk(probabilities, k=min(k, len(labels)), sorted=True)
    return [ClassScore(labels[index], value) for value, index in zip(values.tolist(), indices.tolist(), strict=True)]
