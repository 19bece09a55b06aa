"""How closely the served model families answer like their reference pipelines, same JPEG in.

For each mmpretrain pipeline (and the ONNX zoo's), a seeded random checkpoint is built with the
reference library itself, its head peaked on the photos (so that transform mistakes show), saved in
the library's format and served as NAME=PATH. Each photo then goes through the reference's full
pipeline (mmpretrain's own transforms and data preprocessor) and through the server's HTTP route;
the table gives the largest probability difference over all classes and photos, whether the top-1
agreed on every photo, and the largest feature difference relative to the feature scale.

    python -m benchmarks.family_agreement                   # with OpenCV, if installed
    python -m benchmarks.family_agreement --without-opencv  # the torch stand-in for OpenCV's resize

Needs the test extra (mmpretrain, mmcv-lite, mmengine). docs/models.md records the figures.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
import skimage.data
import torch
from fastapi.testclient import TestClient
from PIL import Image

from benchmarks.photos import SHARED_IMAGES
from service import opencv_resize
from service.api.app import create_app
from service.config import Settings
from service.models.labels import shipped_labels
from service.models.registry import load_all
from tests.families.mm_reference import make_mm_checkpoint, mm_pipeline_input, mm_reference_outputs

# (served name, mmpretrain backbone, depth, classes, release file name, config, backbone options)
CASES = [
    ("in1k-r18", "ResNet", 18, 1000, "resnet18_8xb32_in1k_20210831-fbbb1da6.pth", "resnet18_8xb32_in1k", {}),
    ("v1d-50", "ResNetV1d", 50, 1000, "resnetv1d50_b32x8_imagenet_20210531-db14775a.pth", "resnetv1d50_8xb32_in1k", {}),
    (
        "rsb-a1",
        "ResNet",
        50,
        1000,
        "resnet50_8xb256-rsb-a1-600e_in1k_20211228-20e21305.pth",
        "resnet50_8xb256-rsb-a1-600e_in1k",
        {},
    ),
    (
        "cifar10-r18",
        "ResNet_CIFAR",
        18,
        10,
        "resnet18_b16x8_cifar10_20210528-bd6371c8.pth",
        "resnet18_8xb16_cifar10",
        {},
    ),
    ("cub-r50", "ResNet", 50, 200, "resnet50_8xb8_cub_20220307-57840e60.pth", "resnet50_8xb8_cub", {}),
    (
        "wide-r50",
        "ResNet",
        50,
        1000,
        "wide-resnet50_3rdparty_8xb32_in1k_20220304-66678344.pth",
        "wide-resnet50_8xb32_in1k",
        {"base_channels": 128, "expansion": 2},
    ),
]


def photos() -> dict[str, bytes]:
    def jpeg(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=92)
        return buffer.getvalue()

    found = {"kitten.jpg": (SHARED_IMAGES / "kitten.jpg").read_bytes()}
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        found[f"{name}.jpg"] = jpeg(getattr(skimage.data, name)())
    return found


def thumbnails(images: dict[str, bytes]) -> dict[str, bytes]:
    """CIFAR's pipeline takes 32x32 images as they are: the same photos at that size, lossless."""
    small = {}
    for name, data in images.items():
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR).save(buffer, "PNG")
        small[name.replace(".jpg", ".png")] = buffer.getvalue()
    return small


def class_index(label: str, classes: int) -> int:
    if classes == 1000:
        return shipped_labels("imagenet").index(label)
    if classes == 10:
        return shipped_labels("cifar10").index(label)
    return int(label)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--without-opencv", action="store_true", help="use the torch stand-in for OpenCV's resize")
    parser.add_argument("--runtime", default="onnxruntime")
    parser.add_argument("--only", nargs="*", help="served names to run (default: all)")
    args = parser.parse_args()
    if args.without_opencv:
        opencv_resize._cv2.cache_clear()
        opencv_resize._cv2 = lambda: None  # type: ignore[assignment]
    print(f"resize for the opencv backend: {opencv_resize.implementation()}; runtime {args.runtime}")
    directory = Path(tempfile.mkdtemp(prefix="family-agreement-"))
    full = photos()
    small = thumbnails(full)
    for name, data in {**full, **small}.items():
        (directory / name).write_bytes(data)
    served, references = [], {}
    for name, backbone, depth, classes, file_name, config, options in CASES:
        if args.only and name not in args.only:
            continue
        images = small if backbone == "ResNet_CIFAR" else full
        probe = torch.cat([mm_pipeline_input(config, directory / photo) for photo in images])
        model, path = make_mm_checkpoint(
            directory, backbone, depth, classes, seed=1, file_name=file_name, probe=probe, **options
        )
        logits, features = mm_reference_outputs(model, probe)
        references[name] = (images, torch.softmax(logits, dim=1), features, classes)
        served.append(f"{name}={path}")
    settings = Settings(models=tuple(served), weights_dir=directory, device="cpu", runtime=args.runtime)
    print(f"{'model':12} {'preset':16} {'max |dp|':>9} {'top-1 equal':>11} {'features':>9}  reference top-1 p")
    with TestClient(create_app(settings, load_models=load_all)) as client:
        for entry in served:
            name = entry.split("=", 1)[0]
            images, probabilities, features, classes = references[name]
            preset = client.get(f"/models/{name}").json()["preprocessing"]["preset"]
            worst_p, worst_f, same_top = 0.0, 0.0, True
            for index, (photo, data) in enumerate(images.items()):
                files = [("data", (photo, data, "application/octet-stream"))]
                answer = client.post(f"/{name}/predict?topk={classes}", files=files).json()["prediction"][0]
                embedding = torch.tensor(client.post(f"/{name}/embed", files=files).json()["embeddings"][0])
                got = torch.zeros(classes)
                for item in answer:
                    got[class_index(item["class"], classes)] = item["probability"]
                worst_p = max(worst_p, (got - probabilities[index]).abs().max().item())
                same_top = same_top and int(got.argmax()) == int(probabilities[index].argmax())
                scale = features[index].abs().max().item()
                worst_f = max(worst_f, (embedding - features[index]).abs().max().item() / scale)
            tops = ", ".join(f"{p:.2f}" for p in probabilities.max(dim=1).values.tolist())
            print(f"{name:12} {preset:16} {worst_p:9.1e} {same_top!s:>11} {worst_f:9.1e}  {tops}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
