"""Fixtures shared by every test folder: real photos and seeded random-init checkpoints."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from service.models.catalog import CATALOG
from service.models.weights import write_random

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
KITTEN = SHARED / "data" / "images" / "kitten.jpg"
KITTEN_SMALL = SHARED / "data" / "images" / "kitten_small.jpg"
SYNSETS = SHARED / "data" / "imagenet_synsets.txt"

# Seeds per model, so every test that loads a model sees the same weights.
SEEDS = {"resnet18v1": 0, "resnet50v1": 1}


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """Real photos as uploaded bytes: the shared kitten files and scikit-image's pictures."""
    return {
        "kitten.jpg": KITTEN.read_bytes(),
        "kitten_small.jpg": KITTEN_SMALL.read_bytes(),
        "chelsea.jpg": jpeg_bytes(skimage.data.chelsea()),
        "coffee.jpg": jpeg_bytes(skimage.data.coffee()),
        "astronaut.jpg": jpeg_bytes(skimage.data.astronaut()),
        "rocket.jpg": jpeg_bytes(skimage.data.rocket()),
    }


@pytest.fixture(scope="session", autouse=True)
def onnx_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every server the tests start (in-process or not) keeps its ONNX exports here, not in ~/.cache:
    shared by the session, so each set of weights is exported once."""
    directory = tmp_path_factory.mktemp("onnx-cache")
    previous = os.environ.get("RESNET_SERVE_ONNX_CACHE_DIR")
    os.environ["RESNET_SERVE_ONNX_CACHE_DIR"] = str(directory)
    yield directory
    if previous is None:
        del os.environ["RESNET_SERVE_ONNX_CACHE_DIR"]
    else:
        os.environ["RESNET_SERVE_ONNX_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("weights")
    for name, seed in SEEDS.items():
        write_random(CATALOG[name], seed, directory)
    return directory


@pytest.fixture
def image_file() -> Callable[..., bytes]:
    """Encode a synthetic image in any mode and format, for the imaging edge cases."""

    def make(mode: str = "RGB", size: tuple[int, int] = (64, 48), fmt: str = "PNG", **save: object) -> bytes:
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **save)
        return buffer.getvalue()

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA; without it they are skipped, so CPU-only CI stays green."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
