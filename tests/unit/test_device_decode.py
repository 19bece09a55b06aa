"""`--decode-on-device`: header checks on the host, pixels decoded with the batch (here on the CPU
device, the same code that runs nvJPEG on CUDA; test_gpu_runner has the CUDA run)."""

from __future__ import annotations

import io
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from service.errors import InsufficientStorage, InvalidInput, UnsupportedMediaType
from service.imaging import EncodedJpeg, Preprocessing, inspect_jpeg, preprocess
from service.models import device_decode
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
    return ModelRunner.with_torch(build_model(spec, weights), SPEC, device=torch.device("cpu"), host_preprocess=host)


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


def _resnet18(weights_dir) -> torch.nn.Module:
    spec = CATALOG["resnet18v1"]
    weights = find_weights(spec, weights_dir)
    assert weights is not None
    return build_model(spec, weights)


def test_rejected_jpegs_are_decoded_side_by_side_on_the_fallback_executor(weights_dir, photos, monkeypatch):
    good = [photos["kitten.jpg"], photos["chelsea.jpg"], photos["coffee.jpg"]]
    truncated = photos["astronaut.jpg"][: len(photos["astronaut.jpg"]) // 2]  # the host refuses it too
    files = [good[0], truncated, good[1], good[2]]
    # Every host decode waits here for all the others: one after another on one thread, the first
    # would wait until the timeout and break the barrier, failing the batch.
    together = threading.Barrier(len(files), timeout=60)
    threads: list[str] = []

    def host(data: bytes) -> torch.Tensor:
        threads.append(threading.current_thread().name)
        together.wait()
        return preprocess(data, SPEC, max_pixels=CAP)

    monkeypatch.setattr(runner_module, "decode_batch", lambda encoded, spec, device: [None] * len(encoded))
    with ThreadPoolExecutor(max_workers=len(files), thread_name_prefix="decode") as pool:
        runner = ModelRunner.with_torch(
            _resnet18(weights_dir), SPEC, device=torch.device("cpu"), host_preprocess=host, fallback_executor=pool
        )
        outputs = runner.predict([inspect_jpeg(data, SPEC, max_pixels=CAP) for data in files])
    assert len(threads) == len(files) and all(name.startswith("decode") for name in threads), threads
    assert isinstance(outputs[1], InvalidInput)  # the bad file fails alone
    blank = torch.zeros(3, SPEC.crop_size, SPEC.crop_size, dtype=torch.uint8)  # what its row holds
    host_path = [preprocess(data, SPEC, max_pixels=CAP) for data in good]
    reference = runner.predict([host_path[0], blank, host_path[1], host_path[2]])
    for index in (0, 2, 3):
        assert isinstance(outputs[index], torch.Tensor)
        assert torch.equal(outputs[index], reference[index])  # the exact host path, bit for bit


def test_without_a_fallback_executor_rejected_jpegs_are_decoded_on_the_calling_thread(runner, photos, monkeypatch):
    monkeypatch.setattr(runner_module, "decode_batch", lambda encoded, spec, device: [None] * len(encoded))
    seen: list[threading.Thread] = []
    host = runner._host_preprocess
    assert host is not None

    def recording(data: bytes) -> torch.Tensor:
        seen.append(threading.current_thread())
        return host(data)

    monkeypatch.setattr(runner, "_host_preprocess", recording)
    outputs = runner.predict([inspect_jpeg(photos["coffee.jpg"], SPEC, max_pixels=CAP)])  # type: ignore[list-item]
    assert isinstance(outputs[0], torch.Tensor)
    assert seen == [threading.current_thread()]


def test_a_fallback_executor_that_has_shut_down_leaves_the_decode_to_the_calling_thread(runner, photos, monkeypatch):
    monkeypatch.setattr(runner_module, "decode_batch", lambda encoded, spec, device: [None] * len(encoded))
    stopped = ThreadPoolExecutor(max_workers=1)
    stopped.shutdown()  # as the server's decode pool is while it stops
    monkeypatch.setattr(runner, "_fallback_executor", stopped)
    data = photos["chelsea.jpg"]
    (output,) = runner.predict([inspect_jpeg(data, SPEC, max_pixels=CAP)])  # type: ignore[list-item]
    (host,) = runner.predict([preprocess(data, SPEC, max_pixels=CAP)])
    assert isinstance(output, torch.Tensor) and torch.equal(output, host)


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 576.00 MiB"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 603979776 bytes"),
    ],
    ids=["cuda", "cpu"],
)
def test_an_image_that_runs_out_of_memory_while_resized_fails_alone(runner, photos, monkeypatch, error):
    names = ["kitten.jpg", "rocket.jpg", "coffee.jpg"]
    items = [inspect_jpeg(photos[name], SPEC, max_pixels=CAP) for name in names]
    blank = torch.zeros(3, SPEC.crop_size, SPEC.crop_size, dtype=torch.uint8)
    reference = runner.predict([items[0], blank, items[2]])  # type: ignore[list-item]
    resize = device_decode._resize_and_crop
    sizes: list[tuple[int, ...]] = []

    def resize_failing_the_second(image: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
        sizes.append(tuple(image.shape))
        if len(sizes) == 2:
            raise error
        return resize(image, spec)

    monkeypatch.setattr(device_decode, "_resize_and_crop", resize_failing_the_second)
    outputs = runner.predict(items)  # type: ignore[arg-type]
    assert len(sizes) == 3  # the images after the failed one were still resized
    failed = outputs[1]
    assert isinstance(failed, InsufficientStorage) and failed.status == 507
    assert "out of memory" in failed.message and "640x427" in failed.message
    for index in (0, 2):
        assert isinstance(outputs[index], torch.Tensor)
        assert torch.equal(outputs[index], reference[index])


def test_an_error_other_than_out_of_memory_still_fails_the_call(photos, monkeypatch):
    def broken(image: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
        raise RuntimeError("a bug, not a lack of memory")

    monkeypatch.setattr(device_decode, "_resize_and_crop", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        decode_batch([inspect_jpeg(photos["coffee.jpg"], SPEC, max_pixels=CAP)], SPEC, torch.device("cpu"))  # type: ignore[list-item]


class DecoderSpy:
    """Wraps the decoder call and the resize, keeping weak references to every full-size image the
    decoder returned, to see which are still alive at each step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[int] = []  # images per decoder call
        self.full_size: list[weakref.ref[torch.Tensor]] = []
        self.alive_at_each_call: list[int] = []
        self.alive_at_each_resize: list[list[bool]] = []
        decode, resize = device_decode._decode, device_decode._resize_and_crop

        def spying_decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
            self.alive_at_each_call.append(sum(ref() is not None for ref in self.full_size))
            images = decode(data, device)
            self.calls.append(len(images))
            self.full_size.extend(weakref.ref(image) for image in images)
            return images

        def spying_resize(image: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
            self.alive_at_each_resize.append([ref() is not None for ref in self.full_size])
            return resize(image, spec)

        monkeypatch.setattr(device_decode, "_decode", spying_decode)
        monkeypatch.setattr(device_decode, "_resize_and_crop", spying_resize)


def test_each_full_size_image_is_given_back_once_it_is_resized(photos, monkeypatch):
    names = ["kitten.jpg", "chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg"]
    spy = DecoderSpy(monkeypatch)
    decoded = decode_batch([inspect_jpeg(photos[n], SPEC, max_pixels=CAP) for n in names], SPEC, torch.device("cpu"))
    assert all(isinstance(image, torch.Tensor) for image in decoded)
    assert spy.calls == [len(names)]  # small photos: one call, as the hardware decoder likes
    # At the k-th resize, the k full-size images before it are gone; only the rest wait.
    assert spy.alive_at_each_resize == [[k <= i for i in range(len(names))] for k in range(len(names))]


def test_large_images_are_decoded_in_calls_within_the_budget_each_resized_before_the_next(photos, monkeypatch):
    names = ["chelsea.jpg", "coffee.jpg", "kitten.jpg", "astronaut.jpg"]
    sizes = [3 * w * h for w, h in (Image.open(io.BytesIO(photos[n])).size for n in names)]
    budget = sizes[0] + sizes[1]  # room for the first two together
    assert sizes[2] > budget  # the third is larger than the budget: a call of its own all the same
    assert sizes[3] <= budget < sizes[2] + sizes[3]  # the fourth does not fit beside it
    monkeypatch.setattr(device_decode, "DECODE_CHUNK_BYTES", budget)
    spy = DecoderSpy(monkeypatch)
    encoded = [inspect_jpeg(photos[n], SPEC, max_pixels=CAP) for n in names]
    decoded = decode_batch(encoded, SPEC, torch.device("cpu"))  # type: ignore[arg-type]
    assert spy.calls == [2, 1, 1]
    assert spy.alive_at_each_call == [0, 0, 0]  # no full-size image of an earlier call outlives it
    for image, data in zip(decoded, (photos[n] for n in names), strict=True):  # same pixels as in one call
        assert isinstance(image, torch.Tensor)
        difference = (image.int() - preprocess(data, SPEC, max_pixels=CAP).int()).abs()
        assert difference.float().mean().item() < 0.5


def test_the_decoded_size_is_read_from_headers_past_the_first_64_kib():
    # An ICC profile of 200 KB pushes the frame header far past the prefix read first.
    buffer = io.BytesIO()
    Image.fromarray(noise(300, 400)).save(buffer, format="JPEG", icc_profile=b"\x01" * 200_000)
    encoded = inspect_jpeg(buffer.getvalue(), SPEC, max_pixels=CAP)
    assert encoded is not None and encoded.data.numel() > 200_000
    assert device_decode._decoded_bytes(encoded) == 3 * 300 * 400
