"""Which JPEG route to the model input is cheapest, and how far each moves the input from the exact one.

Routes, each ending in the (3, 224, 224) uint8 tensor the model gets:
  exact        service.imaging.preprocess: Pillow decode, torchvision resize (antialiased) and crop;
               bit-identical to torchvision's weights transform, which the accuracy tests hold to 1e-5.
  pil-draft    the same after Pillow's draft(): libjpeg scales by 1/2, 1/4 or 1/8 in the DCT while
               decoding, when the image is at least twice the resize target.
  pil-box      Pillow decode, then one resize of only the source box that the center crop keeps
               (Pillow's `box=`): same filter and scale, a smaller output, rounded differently.
  tv-decode    torchvision.io.decode_jpeg (libjpeg-turbo) then the same resize on the tensor.

For each route: ms per image on one thread over the photo mix, and how far its input is from the
exact route's: mean and max absolute pixel difference, and the largest difference of any class
probability through resnet18 (random-init, seed 0: fine for agreement, not for accuracy).

    python -m benchmarks.decode_routes [--seconds 2]
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable, Sequence

import torch
import torchvision
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from benchmarks.photos import Photo, load_photos
from service.imaging import Preprocessing, decode, preprocess

SPEC = Preprocessing()
MODE = InterpolationMode(SPEC.interpolation.value)  # torchvision's name for the same filter
MAX_PIXELS = 50_000_000
Route = Callable[[bytes], torch.Tensor]


def exact(data: bytes) -> torch.Tensor:
    return preprocess(data, SPEC, max_pixels=MAX_PIXELS)


def pil_draft(data: bytes) -> torch.Tensor:
    image = Image.open(io.BytesIO(data))
    short = min(image.size)
    # Ask for the smallest DCT scale that keeps the shorter side at or above the resize target.
    scale = short / SPEC.resize_size
    image.draft("RGB", (int(image.width / scale) + 1, int(image.height / scale) + 1))
    image = image.convert("RGB")
    resized = F.resize(image, [SPEC.resize_size], interpolation=MODE, antialias=True)
    tensor: torch.Tensor = F.pil_to_tensor(F.center_crop(resized, [SPEC.crop_size]))
    return tensor


def pil_box(data: bytes) -> torch.Tensor:
    image = decode(data, max_pixels=MAX_PIXELS)
    width, height = image.size
    if width <= height:
        new_width, new_height = SPEC.resize_size, int(SPEC.resize_size * height / width)
    else:
        new_width, new_height = int(SPEC.resize_size * width / height), SPEC.resize_size
    # torchvision's center_crop offsets, in the resized image, mapped back to the source.
    left, top = round((new_width - SPEC.crop_size) / 2), round((new_height - SPEC.crop_size) / 2)
    scale_x, scale_y = width / new_width, height / new_height
    box = (left * scale_x, top * scale_y, (left + SPEC.crop_size) * scale_x, (top + SPEC.crop_size) * scale_y)
    cropped = image.resize((SPEC.crop_size, SPEC.crop_size), Image.Resampling.BILINEAR, box=box)
    tensor: torch.Tensor = F.pil_to_tensor(cropped)
    return tensor


def tv_decode(data: bytes) -> torch.Tensor:
    decoded = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    resized = F.resize(decoded, [SPEC.resize_size], interpolation=MODE, antialias=True)
    tensor: torch.Tensor = F.center_crop(resized, [SPEC.crop_size])
    return tensor


ROUTES: dict[str, Route] = {"exact": exact, "pil-draft": pil_draft, "pil-box": pil_box, "tv-decode": tv_decode}


def ms_per_image(route: Route, photos: Sequence[Photo], seconds: float) -> float:
    for photo in photos:
        route(photo.data)
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for photo in photos:
            route(photo.data)
        done += len(photos)
    return (time.perf_counter() - started) * 1000 / done


def probabilities(model: torch.nn.Module, images: list[torch.Tensor]) -> torch.Tensor:
    mean = torch.tensor(SPEC.mean).view(1, 3, 1, 1)
    std = torch.tensor(SPEC.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return torch.softmax(model((torch.stack(images).float() / 255 - mean) / std), dim=1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per route")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    photos = load_photos()
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    reference_inputs = [exact(p.data) for p in photos]
    reference = probabilities(model, reference_inputs)
    print(f"{len(photos)} photos, one thread, torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(f"{'route':10} {'ms/img':>7} {'vs exact':>9} {'mean |dpx|':>11} {'max |dpx|':>10} {'max |dprob|':>12}")
    baseline = 0.0
    for name, route in ROUTES.items():
        ms = ms_per_image(route, photos, args.seconds)
        baseline = baseline or ms
        inputs = [route(p.data) for p in photos]
        diffs = [(a.int() - b.int()).abs() for a, b in zip(inputs, reference_inputs, strict=True)]
        mean_px = sum(d.float().mean().item() for d in diffs) / len(diffs)
        max_px = max(int(d.max().item()) for d in diffs)
        max_prob = (probabilities(model, inputs) - reference).abs().max().item()
        print(f"{name:10} {ms:7.2f} {ms / baseline:8.2f}x {mean_px:11.3f} {max_px:10d} {max_prob:12.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
