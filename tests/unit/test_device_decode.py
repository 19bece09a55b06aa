"""`--decode-on-device`: header checks on the host, pixels decoded with the batch (here on the CPU
device, the same code that runs nvJPEG on CUDA; test_gpu_runner has the CUDA run)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from service.errors import InvalidInput, UnsupportedMediaType
from service.imaging import EncodedJpeg, Preprocessing, inspect_jpeg, preprocess
from service.models import runner as runner_module
from service.models.catalog import CATALOG
from service.models.device_decode import decode_batch, orient
from service.models.runner import ModelRunner
from service.models.weights import build_model, find_weights

SPEC = Preprocessing()
CAP = 50_000_000


def jpeg(array: np.ndarray, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def noise(height: int = 48, width: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)


def with_orientation(data: bytes, orientation: int) -> bytes:
    image = Image.open(io.BytesIO(data))
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_a_tensor_as_pillow_turns_the_image(orientation):
    stored = Image.fromarray(noise())
    exif = stored.getexif()
    exif[0x0112] = orientation
    stored.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(stored))
    tensor = torch.from_numpy(noise()).permute(2, 0, 1)
    assert np.array_equal(orient(tensor, orientation).permute(1, 2, 0).numpy(), expected)


def test_inspect_keeps_a_baseline_jpeg_for_the_device_with_its_orientation(photos):
    encoded = inspect_jpeg(with_orientation(photos["chelsea.jpg"], 6), SPEC, max_pixels=CAP)
    assert isinstance(encoded, EncodedJpeg)
    assert encoded.orientation == 6
    assert encoded.data.dtype == torch.uint8 and encoded.data.ndim == 1


def test_inspect_leaves_what_the_device_cannot_decode_to_the_host(image_file):
    assert inspect_jpeg(image_file("RGB", fmt="PNG"), SPEC, max_pixels=CAP) is None
    assert inspect_jpeg(image_file("CMYK", fmt="JPEG"), SPEC, max_pixels=CAP) is None
    assert inspect_jpeg(jpeg(noise(), progressive=True), SPEC, max_pixels=CAP) is None


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", InvalidInput, "empty"),
        (b"not an image at all", UnsupportedMediaType, "not an image"),
        (jpeg(noise(400, 500)), InvalidInput, "over the limit"),
        (jpeg(noise(2, 600)), InvalidInput, "aspect ratio"),
    ],
    ids=["empty", "garbage", "too-many-pixels", "extreme-aspect"],
)
def test_inspect_refuses_what_preprocess_refuses_with_the_same_error(data, error, message):
    cap = 100_000
    with pytest.raises(error, match=message):
        inspect_jpeg(data, SPEC, max_pixels=cap)
    with pytest.raises(error, match=message):
        preprocess(data, SPEC, max_pixels=cap)


def test_device_decode_is_within_a_level_of_the_host_path(photos):
    encoded = [inspect_jpeg(data, SPEC, max_pixels=CAP) for data in photos.values()]
    assert all(item is not None for item in encoded)
    decoded = decode_batch(encoded, SPEC, torch.device("cpu"))  # type: ignore[arg-type]
    for image, data in zip(decoded, photos.values(), strict=True):
        assert image is not None and image.shape == (3, 224, 224)
        difference = (image.int() - preprocess(data, SPEC, max_pixels=CAP).int()).abs()
        assert difference.float().mean().item() < 0.5
        assert difference.max().item() <= 2


def test_a_rotated_photo_is_decoded_the_right_way_up(photos):
    data = with_orientation(photos["rocket.jpg"], 8)  # rocket is landscape; 8 makes it portrait
    encoded = inspect_jpeg(data, SPEC, max_pixels=CAP)
    assert encoded is not None
    (image,) = decode_batch([encoded], SPEC, torch.device("cpu"))
    assert image is not None
    difference = (image.int() - preprocess(data, SPEC, max_pixels=CAP).int()).abs()
    assert difference.float().mean().item() < 0.5


@pytest.fixture(scope="module")
def runner(weights_dir) -> ModelRunner:
    spec = CATALOG["resnet18v1"]
    weights = find_weights(spec, weights_dir)
    assert weights is not None
    host = lambda data: preprocess(data, SPEC, max_pixels=CAP)  # noqa: E731
    return ModelRunner(build_model(spec, weights), SPEC, device=torch.device("cpu"), host_preprocess=host)


def test_a_mixed_batch_fails_only_the_broken_jpeg(runner, photos):
    good = photos["kitten.jpg"]
    truncated = good[: len(good) // 2]  # a sound header, half the scan: the host refuses it too
    broken = inspect_jpeg(truncated, SPEC, max_pixels=CAP)
    assert broken is not None
    items = [inspect_jpeg(good, SPEC, max_pixels=CAP), broken, preprocess(photos["coffee.jpg"], SPEC, max_pixels=CAP)]
    outputs = runner.predict(items)  # type: ignore[arg-type]
    assert isinstance(outputs[1], InvalidInput)
    reference = runner.predict(
        [preprocess(good, SPEC, max_pixels=CAP), preprocess(photos["coffee.jpg"], SPEC, max_pixels=CAP)]
    )
    assert isinstance(outputs[0], torch.Tensor) and isinstance(reference[0], torch.Tensor)
    assert outputs[0].argmax() == reference[0].argmax()
    assert (outputs[0] - reference[0]).abs().max().item() < 1e-3
    assert torch.equal(outputs[2], reference[1])  # the host-decoded image in the same batch: untouched


def test_a_jpeg_the_device_decoder_rejects_falls_back_to_the_host(runner, photos, monkeypatch):
    data = photos["astronaut.jpg"]
    monkeypatch.setattr(runner_module, "decode_batch", lambda encoded, spec, device: [None] * len(encoded))
    encoded = inspect_jpeg(data, SPEC, max_pixels=CAP)
    (fallback,) = runner.predict([encoded])  # type: ignore[list-item]
    (host,) = runner.predict([preprocess(data, SPEC, max_pixels=CAP)])
    assert isinstance(fallback, torch.Tensor)
    assert torch.equal(fallback, host)  # the exact host path, bit for bit
