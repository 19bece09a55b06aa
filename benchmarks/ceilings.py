"""What the hardware allows without a server: the bare model's forward and the decode+preprocess step.

(a) torchvision resnet18 (random init) on float input that is already normalised, with the server's
    intra-op threads: img/s at batch 8 and 1, and the single-image forward latency. Per runtime:
    `--runtime torch`: eval, channels_last, inference_mode, `torch.set_num_threads`;
    `--runtime onnxruntime`: the same weights exported as the server exports them, in an
    `InferenceSession` with onnxruntime's defaults and `intra_op_num_threads`.
(b) `service.imaging.preprocess` (decode, EXIF, RGB, resize 256, crop 224) on the photo mix in one
    thread: img/s per core and the mean per-image latency.

Examples:
  python -m benchmarks.ceilings --threads 2
  python -m benchmarks.ceilings --threads 2 --runtime onnxruntime --no-decode
  python -m benchmarks.ceilings --threads 1 --batch-sizes 1,8,16 --seconds 5 --json ceilings.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

from benchmarks.photos import Photo, load_photos

ARCHES = {"resnet18v1": "resnet18", "resnet34v1": "resnet34", "resnet50v1": "resnet50", "resnet101v1": "resnet101"}


@dataclass
class ForwardCeiling:
    arch: str
    threads: int
    batch_size: int
    runtime: str
    img_s: float
    median_batch_ms: float
    iterations: int
    cpu_ms_per_img: float = 0.0  # CPU time (all threads) per image: steadier than img/s on a busy machine


@dataclass
class DecodeCeiling:
    img_s_per_core: float
    mean_ms: float
    per_photo_ms: dict[str, float]
    iterations: int


@cache
def _model(arch: str) -> Any:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    return model.to(memory_format=torch.channels_last)


@cache
def _onnx_session(arch: str, threads: int) -> Any:
    import onnxruntime

    from service.models.onnx_export import export_onnx

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    data = export_onnx(_model(arch), input_size=224, model=arch)
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _forward_function(arch: str, runtime: str, threads: int) -> Callable[[Any], Any]:
    import torch

    torch.set_num_threads(threads)
    if runtime == "onnxruntime":
        session = _onnx_session(arch, threads)
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x.numpy()})
    model = _model(arch)
    return lambda x: model(x.contiguous(memory_format=torch.channels_last))


def forward_ceiling(
    arch: str = "resnet18",
    *,
    threads: int,
    batch_size: int,
    seconds: float = 3.0,
    warmup: int = 2,
    runtime: str = "torch",
) -> ForwardCeiling:
    """Bare forward throughput: as many batches as fit in `seconds` (at least 3), after `warmup`."""
    import torch

    forward = _forward_function(arch, runtime, threads)
    generator = torch.Generator().manual_seed(batch_size)
    x = torch.randn(batch_size, 3, 224, 224, generator=generator)
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            forward(x)
        stop_at = time.perf_counter() + seconds
        cpu0 = time.process_time()
        while (time.perf_counter() < stop_at or len(times) < 3) and len(times) < 10_000:
            started = time.perf_counter()
            forward(x)
            times.append(time.perf_counter() - started)
        cpu = time.process_time() - cpu0
    return ForwardCeiling(
        arch=arch,
        threads=threads,
        batch_size=batch_size,
        runtime=runtime,
        img_s=batch_size * len(times) / sum(times),
        median_batch_ms=1000 * statistics.median(times),
        iterations=len(times),
        cpu_ms_per_img=1000 * cpu / (batch_size * len(times)),
    )


def decode_ceiling(photos: Sequence[Photo], *, seconds: float = 2.0) -> DecodeCeiling:
    """Single-thread decode+preprocess over the mix, round robin, each photo equally often."""
    from service.imaging import Preprocessing, preprocess

    spec = Preprocessing()
    for photo in photos:  # warm-up: first decode of a size pays for allocations
        preprocess(photo.data, spec, max_pixels=50_000_000)
    per_photo: dict[str, list[float]] = {p.name: [] for p in photos}
    stop_at = time.perf_counter() + seconds
    rounds = 0
    while (time.perf_counter() < stop_at or rounds < 2) and rounds < 1000:
        for photo in photos:
            started = time.perf_counter()
            preprocess(photo.data, spec, max_pixels=50_000_000)
            per_photo[photo.name].append(time.perf_counter() - started)
        rounds += 1
    means = {name: statistics.fmean(values) for name, values in per_photo.items()}
    mean = statistics.fmean(means.values())
    return DecodeCeiling(
        img_s_per_core=1.0 / mean,
        mean_ms=1000 * mean,
        per_photo_ms={name: 1000 * value for name, value in means.items()},
        iterations=rounds * len(photos),
    )


def measure(
    model: str = "resnet18v1",
    *,
    threads: int,
    batch_sizes: Sequence[int] = (8, 1),
    seconds: float = 3.0,
    photos: Sequence[Photo] | None = None,
    decode: bool = True,
    runtime: str = "torch",
) -> dict[str, Any]:
    arch = ARCHES.get(model, model)
    result: dict[str, Any] = {
        "forward": {
            str(b): asdict(forward_ceiling(arch, threads=threads, batch_size=b, seconds=seconds, runtime=runtime))
            for b in batch_sizes
        }
    }
    if decode:
        result["decode"] = asdict(decode_ceiling(photos if photos is not None else load_photos(), seconds=seconds))
    return result


def format_ceilings(result: dict[str, Any]) -> str:
    lines = []
    for size, f in result["forward"].items():
        lines.append(
            f"forward {f['arch']} {f['runtime']} batch {size:>2} threads {f['threads']}: {f['img_s']:6.1f} img/s, "
            f"{f['median_batch_ms']:.1f} ms a batch (median of {f['iterations']})"
        )
    if "decode" in result:
        d = result["decode"]
        lines.append(f"decode+preprocess, one core: {d['img_s_per_core']:6.1f} img/s, {d['mean_ms']:.2f} ms an image")
        lines.append("  " + ", ".join(f"{name} {ms:.1f}" for name, ms in d["per_photo_ms"].items()) + " (ms)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(prog="python -m benchmarks.ceilings", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18v1", help="catalog name or torchvision arch")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the forward's intra-op threads")
    parser.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch", help="what runs the forward")
    parser.add_argument("--batch-sizes", default="8,1")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--no-decode", action="store_true", help="forward ceilings only")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    result = measure(
        args.model,
        threads=args.threads,
        batch_sizes=sizes,
        seconds=args.seconds,
        decode=not args.no_decode,
        runtime=args.runtime,
    )
    print(format_ceilings(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
