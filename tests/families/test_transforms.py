"""The families' transforms: OpenCV's bilinear as mmcv calls it, the square resize, CIFAR's 32x32."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from service.imaging import preprocess
from service.models.families.presets import PRESETS, guess_preset
from service.opencv_resize import opencv_bilinear, torch_bilinear

pytestmark = pytest.mark.families

CAP = 50_000_000


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut", "rocket"])
def test_without_opencv_the_torch_resize_is_within_one_level_of_cv2(name):
    cv2 = pytest.importorskip("cv2")
    image = getattr(skimage.data, name)()
    height, width = image.shape[:2]
    size = (256, int(256 * width / height)) if width > height else (int(256 * height / width), 256)
    reference = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR).astype(int)
    ours = torch_bilinear(torch.from_numpy(image).permute(2, 0, 1).contiguous(), size).permute(1, 2, 0).numpy()
    difference = np.abs(reference - ours.astype(int))
    # OpenCV rounds 11-bit fixed-point weights; float32 sampling lands one level off on ~10 % of pixels.
    assert difference.max() <= 1
    assert (difference > 0).mean() < 0.2


def test_with_opencv_installed_its_own_resize_is_used():
    cv2 = pytest.importorskip("cv2")
    image = skimage.data.chelsea()
    ours = opencv_bilinear(torch.from_numpy(image).permute(2, 0, 1).contiguous(), (256, 384))
    assert np.array_equal(ours.permute(1, 2, 0).numpy(), cv2.resize(image, (384, 256), interpolation=cv2.INTER_LINEAR))


def test_the_cub_preset_squashes_to_600_then_crops_448():
    image = skimage.data.coffee()  # 400x600: squashed to 600x600, not resized by its short edge
    tensor = preprocess(_jpeg(image), PRESETS["cub"].preprocessing, max_pixels=CAP)
    assert tuple(tensor.shape) == (3, 448, 448)
    cv2 = pytest.importorskip("cv2")
    decoded = np.asarray(Image.open(io.BytesIO(_jpeg(image))).convert("RGB"))
    squashed = cv2.resize(decoded, (600, 600), interpolation=cv2.INTER_LINEAR)[76:524, 76:524]
    assert np.array_equal(squashed, tensor.permute(1, 2, 0).numpy())


def test_cifar_takes_32x32_as_is_and_resizes_a_photo_like_the_others():
    small = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(small).save(png, format="PNG")
    spec = PRESETS["cifar10"].preprocessing
    assert torch.equal(preprocess(png.getvalue(), spec, max_pixels=CAP).permute(1, 2, 0), torch.from_numpy(small))
    photo = preprocess(_jpeg(skimage.data.astronaut()), spec, max_pixels=CAP)
    assert tuple(photo.shape) == (3, 32, 32)


@pytest.mark.parametrize(
    ("file_name", "backbone", "classes", "preset"),
    [
        ("resnet50_8xb256-rsb-a1-600e_in1k_20211228-20e21305.pth", "ResNet", 1000, "rsb"),
        ("resnet50_8xb8_cub_20220307-57840e60.pth", "ResNet", 200, "cub"),
        ("resnet50_3rdparty-mill_in21k_20220331-faac000b.pth", "ResNet", 11221, "mill-in21k"),
        ("resnet50_b16x8_cifar100_20210528-67b58a1b.pth", "ResNet_CIFAR", 100, "cifar100"),
        ("resnet18_b16x8_cifar10_20210528-bd6371c8.pth", "ResNet_CIFAR", 10, "cifar10"),
        ("my_cifar_net.pth", "ResNet_CIFAR", 100, "cifar100"),
        ("resnetv1d50_b32x8_imagenet_20210531-db14775a.pth", "ResNetV1d", 1000, "mmpretrain-pil"),
        ("resnet50_8xb32_in1k_20210831-ea4938fc.pth", "ResNet", 1000, "mmpretrain-in1k"),
        ("wide-resnet50_3rdparty_8xb32_in1k_20220304-66678344.pth", "ResNet", 1000, "mmpretrain-pil"),
        ("wide-resnet50_3rdparty-timm_8xb32_in1k_20220304-83ae4399.pth", "ResNet", 1000, "mmpretrain-pil-bicubic"),
    ],
)
def test_released_file_names_pick_their_pipeline(file_name, backbone, classes, preset):
    assert guess_preset("mmpretrain", file_name, backbone=backbone, num_classes=classes) == preset


@pytest.mark.parametrize(
    ("backbone", "wide", "classes", "preset"),
    [
        ("ResNet", False, 1000, "mmpretrain-in1k"),
        ("ResNetV1c", False, 1000, "mmpretrain-pil"),
        ("ResNetV1d", False, 1000, "mmpretrain-pil"),
        ("ResNet", True, 1000, "mmpretrain-pil"),
        ("ResNet_CIFAR", False, 100, "cifar100"),
        ("ResNet", False, 200, "cub"),
    ],
)
def test_renamed_files_fall_back_to_their_architecture(backbone, wide, classes, preset):
    assert guess_preset("mmpretrain", "model.pth", backbone=backbone, wide=wide, num_classes=classes) == preset
