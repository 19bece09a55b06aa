"""What int8 static quantisation costs in accuracy and buys in speed, on ONNX Runtime's CPU provider.

resnet18 (torchvision, random init, seed 0) is made "peaked" so that top-1 means something: its
BatchNorm running statistics are randomised (mean ~ N(0, 0.1), var ~ U(0.5, 1.5)), and its fc layer
is re-fitted on a third set of photos to standardise the pooled features, then scaled so the
softmax commits to a class (mean top-1 probability about 0.56). Randomised statistics and a scaled
fc alone put every photo in the same class. The plain random-init model is measured too: its top-1
spreads over 1 or 2 classes, so its agreement says little. Each is exported to fp32 ONNX as the server does
(legacy exporter, opset 17, dynamic batch), quantised by `service.models.quantize.quantize_int8`
calibrated on one set of photos, and compared with fp32 on a different, larger set: both sets are
seeded variations (crops, scales, flips, rotations, colour and brightness, JPEG quality) of the
benchmark photo mix, decoded by the server's own `service.imaging.preprocess`.

Speed is the bare forward of the two sessions (2 intra-op threads), in interleaved rounds so that
noise from a shared machine hits both alike.

Examples:
  python -m benchmarks.quantize_agreement
  python -m benchmarks.quantize_agreement --images 1000 --json quantize.json
  python -m benchmarks.quantize_agreement --sweep      # the recipe table (several minutes)
  # your own resnet18 weights and photos: the agreement that matters for serving them
  python -m benchmarks.quantize_agreement --weights weights/resnet18-f37072fd.pth \
      --calibration-dir photos/calibration --evaluation-dir photos/held-out
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.photos import load_photos
from service.imaging import Preprocessing, preprocess
from service.models.quantize import DEFAULT_RECIPE, QuantRecipe, calibration_images, normalised, quantize_int8

MAX_PIXELS = 50_000_000
PREPROCESSING = Preprocessing()
# The peaked model's logit spread: its mean top-1 probability on the photos comes out near 0.6.
LOGIT_STD = 8.0
# A top-1 probability above which fp32 is "sure": agreement there is closer to what a trained model sees.
CONFIDENT = 0.5


@dataclass
class Agreement:
    recipe: str
    images: int
    top1_agree: int
    top1_agree_pct: float
    top5_overlap_pct: float  # mean share of fp32's top-5 classes that int8's top-5 also has
    max_abs_dp_mean: float  # mean over images of max |p_int8 - p_fp32|
    fp32_mean_top1_prob: float
    fp32_distinct_top1: int  # how many classes fp32's top-1 spreads over: 1 would make agreement trivial
    confident_images: int  # those where fp32's top-1 probability is at least CONFIDENT
    confident_top1_agree: int
    confident_top1_agree_pct: float


@dataclass
class Speed:
    name: str
    batch8_img_s: float
    batch1_p50_ms: float


def build_resnet18(*, peaked: bool, fit: np.ndarray | None = None, seed: int = 0) -> Any:
    """torchvision resnet18, random init (seed 0). Peaked: BatchNorm running statistics randomised,
    and fc re-fitted on `fit` (normalised images) to standardise the pooled features it sees, then
    scaled so that its logits have a standard deviation of LOGIT_STD. Without the standardisation
    every photo lands in the same class (the features' shared positive mean dominates), and top-1
    agreement would be trivially 100 %."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None).eval()
    if not peaked:
        return model
    if fit is None:
        raise ValueError("a peaked model needs images to fit its fc layer on")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
        fc, model.fc = model.fc, torch.nn.Identity()
        features = model(torch.from_numpy(fit))
        # Floored at the median: a feature (nearly) constant over photos, e.g. a dead channel, would
        # otherwise get a huge weight that amplifies noise rather than the photo.
        mean, std = features.mean(0), features.std(0)
        std = std.clamp(min=float(std.median()))
        weight = fc.weight / std
        scale = LOGIT_STD / float(((features - mean) @ weight.T).std())
        fc.weight.copy_(weight * scale)
        fc.bias.copy_(-(fc.weight @ mean))
        model.fc = fc
    return model


def export_onnx(model: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    # The legacy exporter, on purpose (the server's choice): its deprecation notice is not news here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 224, 224),),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["data"],
            output_names=["logits"],
            dynamic_axes={"data": {0: "batch"}, "logits": {0: "batch"}},
        )
    return buffer.getvalue()


def varied_images(count: int, seed: int) -> list[bytes]:
    """`count` encoded variations of the photo mix: crop, scale, flip, rotation, colour, JPEG quality."""
    from PIL import Image, ImageEnhance

    rng = random.Random(seed)
    bases = [Image.open(io.BytesIO(photo.data)).convert("RGB") for photo in load_photos()]
    out: list[bytes] = []
    for index in range(count):
        image = bases[index % len(bases)]
        width, height = image.size
        area = rng.uniform(0.15, 1.0) * width * height
        aspect = rng.uniform(3 / 4, 4 / 3)
        crop_w = max(16, min(width, round((area * aspect) ** 0.5)))
        crop_h = max(16, min(height, round((area / aspect) ** 0.5)))
        left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        image = image.crop((left, top, left + crop_w, top + crop_h))
        short = rng.randint(112, 720)
        factor = short / min(image.size)
        image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < 0.5:
            image = image.rotate(rng.uniform(-30, 30), resample=Image.Resampling.BILINEAR, expand=rng.random() < 0.5)
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.4, 1.6))
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.6, 1.4))
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.7, 1.3))
        buffer = io.BytesIO()
        if rng.random() < 0.1:
            image.save(buffer, format="PNG")
        else:
            image.save(buffer, format="JPEG", quality=rng.randint(25, 95))
        out.append(buffer.getvalue())
    return out


def decoded(datas: Sequence[bytes]) -> np.ndarray:
    """Through the server's decode and transform, normalised as the runner does: (N, 3, 224, 224)."""
    return np.concatenate(
        [normalised(preprocess(data, PREPROCESSING, max_pixels=MAX_PIXELS), PREPROCESSING) for data in datas]
    )


def session(model: bytes, threads: int = 2) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def probabilities(sess: Any, x: np.ndarray, batch: int = 16) -> np.ndarray:
    logits = np.concatenate([sess.run(None, {"data": x[i : i + batch]})[0] for i in range(0, len(x), batch)])
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    result: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return result


def agreement(recipe: str, reference: np.ndarray, quantised: np.ndarray) -> Agreement:
    top1_ref, top1_q = reference.argmax(axis=1), quantised.argmax(axis=1)
    top5_ref = np.argsort(-reference, axis=1)[:, :5]
    top5_q = np.argsort(-quantised, axis=1)[:, :5]
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5_ref, top5_q, strict=True)])
    agree = int((top1_ref == top1_q).sum())
    confident = reference.max(axis=1) >= CONFIDENT
    confident_agree = int((top1_ref == top1_q)[confident].sum())
    return Agreement(
        recipe=recipe,
        images=len(reference),
        top1_agree=agree,
        top1_agree_pct=round(100 * agree / len(reference), 2),
        top5_overlap_pct=round(100 * float(overlap), 2),
        max_abs_dp_mean=round(float(np.abs(quantised - reference).max(axis=1).mean()), 5),
        fp32_mean_top1_prob=round(float(reference.max(axis=1).mean()), 4),
        fp32_distinct_top1=len(set(top1_ref.tolist())),
        confident_images=int(confident.sum()),
        confident_top1_agree=confident_agree,
        confident_top1_agree_pct=round(100 * confident_agree / max(1, int(confident.sum())), 2),
    )


def speeds(sessions: dict[str, Any], *, rounds: int = 6, batches: int = 3, singles: int = 8) -> list[Speed]:
    """Bare forward of each session, interleaved: every round runs each one, in a rotating order."""
    rng = np.random.default_rng(0)
    x8 = rng.standard_normal((8, 3, 224, 224), dtype=np.float32)
    x1 = x8[:1].copy()
    names = list(sessions)
    for sess in sessions.values():  # warm-up: first runs allocate
        sess.run(None, {"data": x8})
        sess.run(None, {"data": x1})
    rates: dict[str, list[float]] = {name: [] for name in names}
    latencies: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            sess = sessions[name]
            started = time.perf_counter()
            for _ in range(batches):
                sess.run(None, {"data": x8})
            rates[name].append(8 * batches / (time.perf_counter() - started))
            for _ in range(singles):
                started = time.perf_counter()
                sess.run(None, {"data": x1})
                latencies[name].append(1000 * (time.perf_counter() - started))
    return [
        Speed(name, round(statistics.median(rates[name]), 1), round(statistics.median(latencies[name]), 2))
        for name in names
    ]


def calibration_set(count: int, seed: int) -> list[np.ndarray]:
    """The calibration photos written to a directory and read back by `calibration_images`, as the server would."""
    with tempfile.TemporaryDirectory(prefix="quantize-calibration-") as directory:
        for index, data in enumerate(varied_images(count, seed)):
            suffix = ".png" if data.startswith(b"\x89PNG") else ".jpg"
            (Path(directory) / f"{index:04d}{suffix}").write_bytes(data)
        return calibration_images(Path(directory), PREPROCESSING, limit=count)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="evaluation images (default 512)")
    parser.add_argument("--calibration", type=int, default=64, help="calibration images (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--sweep", action="store_true", help="compare quantisation recipes on the peaked model")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--weights", type=Path, help="a resnet18 checkpoint to measure instead of the peaked model")
    parser.add_argument("--calibration-dir", type=Path, help="calibrate on these photos instead of the variations")
    parser.add_argument("--evaluation-dir", type=Path, help="evaluate on these photos instead of the variations")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    # Different seeds: calibration, evaluation and the peaked model's fc fit see different images.
    calibration = (
        calibration_images(args.calibration_dir, PREPROCESSING, limit=args.calibration)
        if args.calibration_dir
        else calibration_set(args.calibration, seed=1)
    )
    evaluation = (
        np.concatenate(calibration_images(args.evaluation_dir, PREPROCESSING, limit=args.images))
        if args.evaluation_dir
        else decoded(varied_images(args.images, seed=2))
    )
    print(f"{len(calibration)} calibration images, {len(evaluation)} evaluation images")

    results: dict[str, Any] = {"threads": args.threads, "calibration_images": len(calibration)}
    if args.weights:
        import torchvision

        from service.models.weights import read_state_dict

        given = torchvision.models.resnet18(weights=None)
        given.load_state_dict(read_state_dict(args.weights))
        # Named "peaked" so that the speed table and the sweep treat it as the model under test.
        models = {"peaked": given.eval()}
    else:
        models = {"peaked": build_resnet18(peaked=True, fit=decoded(varied_images(64, seed=3)))}
        if not args.sweep:
            models["plain"] = build_resnet18(peaked=False)
    recipes = sweep_recipes() if args.sweep else [DEFAULT_RECIPE]
    agreements: list[dict[str, Any]] = []
    sessions: dict[str, Any] = {}
    for model_name, model in models.items():
        fp32 = export_onnx(model)
        fp32_session = session(fp32, args.threads)
        reference = probabilities(fp32_session, evaluation)
        if model_name == "peaked":
            sessions["fp32"] = fp32_session
        for recipe in recipes:
            t0 = time.perf_counter()
            int8 = quantize_int8(fp32, calibration, recipe=recipe)
            quantise_s = time.perf_counter() - t0
            int8_session = session(int8, args.threads)
            result = agreement(recipe.label, reference, probabilities(int8_session, evaluation))
            row = {"model": model_name, **asdict(result), "quantise_s": round(quantise_s, 1)}
            agreements.append(row)
            print(_agreement_line(row), flush=True)
            if model_name == "peaked":
                sessions[f"int8 {recipe.label}"] = int8_session
    results["agreement"] = agreements
    measured = speeds(sessions)
    results["speed"] = [asdict(speed) for speed in measured]
    print(f"\nbare forward, {args.threads} intra-op threads, interleaved rounds")
    print(f"{'session':<56} {'batch 8 img/s':>15} {'batch 1 p50 ms':>15}")
    base = measured[0]
    for speed in measured:
        print(
            f"{speed.name:<56} {speed.batch8_img_s:>7.1f} ({speed.batch8_img_s / base.batch8_img_s:.2f}x) "
            f"{speed.batch1_p50_ms:>7.2f} ({base.batch1_p50_ms / speed.batch1_p50_ms:.2f}x)"
        )
    results["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"\n{results['wall_s']} s in all")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _agreement_line(row: dict[str, Any]) -> str:
    confident = row["confident_images"]
    sure = (
        f"{row['confident_top1_agree']}/{confident} ({row['confident_top1_agree_pct']:.1f} %)" if confident else "none"
    )
    return (
        f"{row['model']} model, int8 {row['recipe']} ({row['quantise_s']} s to quantise)\n"
        f"  top-1 agreement {row['top1_agree']}/{row['images']} ({row['top1_agree_pct']:.1f} %); "
        f"where fp32's top-1 p >= {CONFIDENT}: {sure}\n"
        f"  top-5 overlap {row['top5_overlap_pct']:.1f} %, max |dp| mean {row['max_abs_dp_mean']:.4f}\n"
        f"  fp32: mean top-1 probability {row['fp32_mean_top1_prob']:.3f}, "
        f"top-1 over {row['fp32_distinct_top1']} classes"
    )


def sweep_recipes() -> list[QuantRecipe]:
    """The default recipe, then one change at a time (and the per-tensor variant of the head's)."""
    return [
        QuantRecipe(),
        QuantRecipe(quantize_head=True),
        QuantRecipe(per_channel=False),
        QuantRecipe(per_channel=False, quantize_head=True),
        QuantRecipe(reduce_range=True),
        QuantRecipe(activations_signed=True),
        QuantRecipe(weights_signed=False),
        QuantRecipe(method="entropy"),
        QuantRecipe(method="percentile"),
        QuantRecipe(qdq=False),
        QuantRecipe(preprocess=False),
    ]


if __name__ == "__main__":
    main()
