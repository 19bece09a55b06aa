"""The server's model path against the bare forward it wraps, measured in the same run.

  bare    torchvision's model on an already-normalised float batch resident on the device:
          channels_last, inference mode, autocast to --dtype; nothing else. The ceiling.
  path    what the server does per batch: a list of uint8 images in, stacked into (pinned) host
          memory, copied to the device, normalised there, forwarded (a CUDA graph per bucket on
          CUDA), probabilities back on the host, top-5 with labels out. Serial: stage then run.
  overlap the same, with the next batch staged on a second thread while the current one runs, as
          the server does with --max-batches-in-flight 2.

Issue 4's goal on one H100 with ResNet-50: path >= 0.6 x bare at fp16. On a CPU the same script
runs in fp32 (and without graphs), which shows what staging and top-k cost there.

    python -m benchmarks.model_path --arch resnet50 --batch-size 64 --dtype float16   # on a GPU
    python -m benchmarks.model_path --arch resnet18 --batch-size 8                    # on a CPU
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torchvision

from service.config import power_of_two_buckets
from service.imaging import Preprocessing
from service.models.runner import DTYPES, ExecutionPlan, ModelRunner, StagedBatch
from service.postprocessing import top_k


def timed(step: Callable[[], object], *, seconds: float, images_per_step: int, device: torch.device) -> float:
    """Images per second of `step`, run back to back for about `seconds` after two warm-up calls."""
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        done += images_per_step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return done / (time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype, batch_size = torch.device(args.device), DTYPES[args.dtype], args.batch_size
    on_cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.arch, weights=None).eval()
    spec = Preprocessing()
    labels = [f"class {i}" for i in range(1000)]
    images = [torch.randint(0, 256, (3, spec.crop_size, spec.crop_size), dtype=torch.uint8) for _ in range(batch_size)]

    bare_model = torchvision.models.get_model(args.arch, weights=None).eval().to(device)
    bare_model.load_state_dict(model.state_dict())
    bare_model = bare_model.to(memory_format=torch.channels_last)
    bare_input = torch.randn(batch_size, 3, spec.crop_size, spec.crop_size, device=device)
    bare_input = bare_input.contiguous(memory_format=torch.channels_last)

    def bare() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            bare_model(bare_input)

    plan = ExecutionPlan(buckets=power_of_two_buckets(batch_size), cuda_graphs=on_cuda) if on_cuda else ExecutionPlan()
    runner = ModelRunner.with_torch(model, spec, device=device, dtype=dtype, plan=plan)
    runner.warm_up([1, batch_size])

    def path() -> None:
        for probabilities in runner.predict(images):
            top_k(probabilities, labels, 5)

    stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")
    next_batch = [stager.submit(runner.stage, images)]

    def overlap() -> None:
        staged: StagedBatch = next_batch[0].result()
        next_batch[0] = stager.submit(runner.stage, images)
        for probabilities in runner.run(staged):
            top_k(probabilities, labels, 5)

    results = {}
    for name, step in (("bare", bare), ("path", path), ("overlap", overlap), ("bare again", bare)):
        results[name] = timed(step, seconds=args.seconds, images_per_step=batch_size, device=device)
    stager.shutdown()
    ceiling = (results["bare"] + results["bare again"]) / 2
    what = torch.cuda.get_device_name(device) if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.arch} batch {batch_size} {args.dtype} on {what}; plan {plan}")
    for name, rate in results.items():
        print(f"{name:11} {rate:9.1f} img/s   {rate / ceiling:5.2f} x bare")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
