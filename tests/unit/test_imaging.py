"""Decoding and preprocessing: agreement with torchvision's transform, modes, EXIF, caps, bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageOps
from torchvision.models import ResNet18_Weights, ResNet50_Weights, WeightsEnum
from torchvision.transforms import InterpolationMode

from service.errors import InvalidInput, UnsupportedMediaType
from service.imaging import Interpolation, Preprocessing, ResizeMode, decode, preprocess, to_model_input
from service.models.catalog import CATALOG

PIXELS = 50_000_000


def normalised(image: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """What the runner does on the device, on the CPU here."""
    x = image.to(torch.float32).div(255)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return (x - mean) / std


def preprocessing_of(weights: WeightsEnum) -> Preprocessing:
    official = CATALOG[weights.url.rsplit("/", 1)[1].split("-")[0] + "v1"].official_by_filename(
        weights.url.rsplit("/", 1)[1]
    )
    assert official is not None
    return official.preprocessing


@pytest.mark.parametrize("weights", [ResNet18_Weights.IMAGENET1K_V1, ResNet50_Weights.IMAGENET1K_V2])
def test_matches_torchvisions_own_transform_on_real_photos(photos, weights):
    spec = preprocessing_of(weights)
    reference_transform = weights.transforms()
    for name, data in photos.items():
        ours = normalised(preprocess(data, spec, max_pixels=PIXELS), spec)
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        reference = reference_transform(image)
        assert ours.shape == reference.shape == (3, 224, 224), name
        assert torch.equal(ours, reference), f"{name}: max diff {(ours - reference).abs().max()}"


def test_v2_weights_resize_to_232_and_v1_to_256():
    assert preprocessing_of(ResNet50_Weights.IMAGENET1K_V2).resize_size == 232
    assert preprocessing_of(ResNet50_Weights.IMAGENET1K_V1).resize_size == 256


@pytest.mark.parametrize("interpolation", list(Interpolation))
@pytest.mark.parametrize("size", [(224, 224), (256, 256), (257, 331), (640, 239), (1001, 1000), (300, 4000)])
def test_resize_and_crop_are_torchvisions_pil_calls_bit_for_bit(interpolation, size):
    """torchvision is not imported by the server (see service/imaging.py): its resize and centre crop
    on a PIL image, odd sizes, exact sizes and every filter, held to torchvision's own functions."""
    generator = np.random.default_rng(size[0] * 7919 + size[1])
    image = Image.fromarray(generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    for spec in (
        Preprocessing(interpolation=interpolation),
        Preprocessing(resize_size=232, interpolation=interpolation),
        Preprocessing(resize_size=255, crop_size=227, interpolation=interpolation),
    ):
        mode = InterpolationMode(interpolation.value)
        expected = F.pil_to_tensor(
            F.center_crop(F.resize(image, [spec.resize_size], interpolation=mode), [spec.crop_size])
        )
        assert torch.equal(to_model_input(image, spec, max_pixels=PIXELS), expected), spec
    square = Preprocessing(resize_size=600, crop_size=448, mode=ResizeMode.SQUARE, interpolation=interpolation)
    mode = InterpolationMode(interpolation.value)
    expected = F.pil_to_tensor(F.center_crop(F.resize(image, [600, 600], interpolation=mode), [448]))
    assert torch.equal(to_model_input(image, square, max_pixels=PIXELS), expected)


def test_a_resize_smaller_than_the_crop_is_refused_when_defined():
    with pytest.raises(ValueError, match="resize_size 200 is smaller than crop_size 224"):
        Preprocessing(resize_size=200)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "1"])
def test_any_mode_becomes_rgb(image_file, mode):
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I" else "PNG")
    tensor = preprocess(image_file(mode=mode, fmt=fmt), Preprocessing(), max_pixels=PIXELS)
    assert tensor.shape == (3, 224, 224)
    assert tensor.dtype == torch.uint8


def test_sixteen_bit_images_are_scaled_not_clipped():
    wide = np.full((8, 8), 40000, dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    rgb = decode(buffer.getvalue(), max_pixels=PIXELS)
    assert rgb.getpixel((0, 0)) == (40000 >> 8,) * 3


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    # A 40x20 landscape image; orientations 5-8 rotate it to portrait.
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    decoded = decode(buffer.getvalue(), max_pixels=PIXELS)
    assert decoded.size == ((20, 40) if orientation >= 5 else (40, 20))


def test_corrupt_exif_does_not_cost_the_image(photos):
    data = bytearray(photos["kitten.jpg"])
    start = data.find(b"Exif\x00\x00")
    assert start > 0, "kitten.jpg carries EXIF"
    data[start + 6 : start + 40] = b"\xff" * 34
    assert preprocess(bytes(data), Preprocessing(), max_pixels=PIXELS).shape == (3, 224, 224)


def test_first_frame_of_an_animated_gif():
    frames = [Image.new("RGB", (30, 30), color) for color in ((255, 0, 0), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = decode(buffer.getvalue(), max_pixels=PIXELS)
    red, green, _ = decoded.getpixel((5, 5))
    assert red > 200 and green < 50


def test_empty_upload_is_invalid():
    with pytest.raises(InvalidInput, match="empty"):
        decode(b"", max_pixels=PIXELS)


@pytest.mark.parametrize("payload", [b"hello, world", b"%PDF-1.4\n", b"\x7fELF\x02\x01\x01", b"<svg></svg>"])
def test_non_images_are_unsupported_media(payload):
    with pytest.raises(UnsupportedMediaType):
        decode(payload, max_pixels=PIXELS)


def test_truncated_jpeg_is_invalid(photos):
    with pytest.raises(InvalidInput, match="could not be decoded"):
        decode(photos["kitten.jpg"][:5000], max_pixels=PIXELS)


def test_pixel_cap_is_checked_from_the_header_before_decoding():
    buffer = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buffer, format="PNG")
    with pytest.raises(InvalidInput, match="over the limit"):
        decode(buffer.getvalue(), max_pixels=1_000_000)


def test_extreme_aspect_ratio_is_refused_before_resizing(image_file):
    with pytest.raises(InvalidInput, match="aspect ratio"):
        preprocess(image_file(size=(20000, 3)), Preprocessing(), max_pixels=PIXELS)


def test_eps_is_not_opened():
    with pytest.raises(UnsupportedMediaType):
        decode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", max_pixels=PIXELS)
