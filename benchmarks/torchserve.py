"""resnet-serve against TorchServe 0.12: the same weights, the same photos, the same load, one run.

Both servers get the seeded random-init resnet18 (seed 0) that every benchmark uses. TorchServe
serves it as its own examples do: a .mar of torchvision's resnet18 definition (`model.py`), the
state dict and ImageNet's labels, with the stock `image_classifier` handler (decode, resize, crop
and normalise in the Python worker, softmax and top 5). Its configuration, chosen to be fair on a
small CPU box:
  - one worker (`--ts-workers`) with all the usable cores as intra-op threads (OMP_NUM_THREADS,
    split evenly when there are several workers), as resnet-serve uses them;
  - batches of up to 8 (`--ts-batch-size`) with a 2 ms window (`--ts-max-batch-delay-ms`), as
    resnet-serve's CPU defaults;
  - no CPU launcher (IPEX's core pinning), no token auth, no system metrics, loopback ports only.
resnet-serve runs with its defaults (`--server-flags` adds flags). Then benchmarks.loadgen's compare
mode drives resnet-serve (A) and TorchServe (B) in turn at each level, and this prints the ratio
resnet-serve / TorchServe. TorchServe comes from scripts/install-torchserve.sh (its own venv, the
project's torch; Java 11+).

    python -m benchmarks.torchserve [--concurrency 1,16] [--duration 20] [--server-flags="--runtime torch"]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import loadgen
from benchmarks.harness.server import HOST, REPO, free_port, serving, wait_ready, write_weights

MODEL = "resnet18v1"  # resnet-serve's name
TS_MODEL = "resnet18"  # TorchServe's name, as in its examples: /predictions/resnet18
DEFAULT_VENV = REPO / ".torchserve-venv"

# torchvision's resnet18, as TorchServe's examples/image_classifier/resnet_18/model.py defines it:
# the handler instantiates the one class defined in the file and loads the state dict into it.
MODEL_PY = """\
from torchvision.models.resnet import BasicBlock, ResNet


class ImageClassifier(ResNet):
    def __init__(self):
        super().__init__(BasicBlock, [2, 2, 2, 2])
"""


@dataclass(frozen=True)
class ArchiveInputs:
    model_file: Path
    serialized_file: Path
    labels_file: Path


def write_archive_inputs(weights_file: Path, directory: Path) -> ArchiveInputs:
    """model.py, the state dict as resnet18.pth (TorchServe loads it with torch.load) and
    index_to_name.json, from resnet-serve's safetensors weights."""
    import torch
    import torchvision
    from safetensors.torch import load_file

    state_dict = load_file(weights_file)
    torchvision.models.resnet18().load_state_dict(state_dict)  # fails loudly on a mismatch
    inputs = ArchiveInputs(directory / "model.py", directory / "resnet18.pth", directory / "index_to_name.json")
    inputs.model_file.write_text(MODEL_PY)
    torch.save(state_dict, inputs.serialized_file)
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    inputs.labels_file.write_text(json.dumps({str(i): name for i, name in enumerate(categories)}))
    return inputs


def archiver_command(archiver: Path, inputs: ArchiveInputs, export_dir: Path) -> list[str]:
    """torch-model-archiver's arguments for resnet18.mar with the stock image_classifier handler."""
    return [
        str(archiver), "--model-name", TS_MODEL, "--version", "1.0",
        "--model-file", str(inputs.model_file), "--serialized-file", str(inputs.serialized_file),
        "--handler", "image_classifier", "--extra-files", str(inputs.labels_file),
        "--export-path", str(export_dir), "--force",
    ]  # fmt: skip


@dataclass(frozen=True)
class TorchServeConfig:
    workers: int = 1
    batch_size: int = 8
    max_batch_delay_ms: int = 2
    response_timeout_s: int = 120


def config_properties(config: TorchServeConfig, ports: dict[str, int]) -> str:
    """TorchServe's config.properties: loopback ports, the model's batching, nothing extra running."""
    model = {
        TS_MODEL: {
            "1.0": {
                "defaultVersion": True, "marName": f"{TS_MODEL}.mar",
                "minWorkers": config.workers, "maxWorkers": config.workers,
                "batchSize": config.batch_size, "maxBatchDelay": config.max_batch_delay_ms,
                "responseTimeout": config.response_timeout_s,
            }
        }
    }  # fmt: skip
    lines = [
        f"inference_address=http://{HOST}:{ports['inference']}",
        f"management_address=http://{HOST}:{ports['management']}",
        f"metrics_address=http://{HOST}:{ports['metrics']}",
        f"grpc_inference_address={HOST}",
        f"grpc_inference_port={ports['grpc_inference']}",
        f"grpc_management_address={HOST}",
        f"grpc_management_port={ports['grpc_management']}",
        f"default_workers_per_model={config.workers}",
        "cpu_launcher_enable=false",
        "disable_token_authorization=true",
        "disable_system_metrics=true",
        "install_py_dep_per_model=false",
        f"models={json.dumps(model)}",
    ]
    return "\n".join(lines) + "\n"


def worker_threads(workers: int, cpus: int | None = None) -> int:
    """Intra-op threads of each TorchServe worker: the usable cores shared evenly, at least one."""
    usable = cpus if cpus is not None else len(os.sched_getaffinity(0))
    return max(1, usable // workers)


@contextlib.contextmanager
def torchserve(venv: Path, work: Path, config: TorchServeConfig) -> Iterator[str]:
    """TorchServe started from `venv` with resnet18.mar from `work / "store"`, ready (its /ping
    answers 200); stopped on exit, even on error. Yields its inference URL."""
    ports = {name: free_port() for name in ("inference", "management", "metrics", "grpc_inference", "grpc_management")}
    config_file = work / "config.properties"
    config_file.write_text(config_properties(config, ports))
    # TorchServe keeps its pid file in the temp dir and its logs and key file in the working dir:
    # a private one of each, so that this run neither sees nor stops another TorchServe.
    env = {
        **os.environ, "TMPDIR": str(work), "LOG_LOCATION": str(work / "logs"),
        "METRICS_LOCATION": str(work / "logs"), "OMP_NUM_THREADS": str(worker_threads(config.workers)),
    }  # fmt: skip
    command = [str(venv / "bin" / "torchserve")]
    log_path = work / "torchserve.out"
    url = f"http://{HOST}:{ports['inference']}"
    try:
        with log_path.open("wb") as log:
            subprocess.run(
                [*command, "--start", "--ncs", "--model-store", str(work / "store"), "--models",
                 f"{TS_MODEL}={TS_MODEL}.mar", "--ts-config", str(config_file), "--disable-token-auth"],
                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, check=True,
            )  # fmt: skip
        wait_ready(url, "/ping", timeout_s=180, log_path=log_path, interval_s=0.5)
        yield url
    finally:
        subprocess.run([*command, "--stop", "--foreground"], cwd=work, env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torchserve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,16", help="client counts, comma-separated (default 1,16)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level and server (default 20)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first (default 3)")
    parser.add_argument(
        "--server-flags", default="", help='extra resnet-serve flags, quoted: --server-flags="--runtime torch"'
    )
    parser.add_argument("--torchserve-venv", type=Path, default=DEFAULT_VENV, help="TorchServe's venv")
    parser.add_argument("--ts-workers", type=int, default=1, help="TorchServe workers (default 1)")
    parser.add_argument("--ts-batch-size", type=int, default=8, help="TorchServe batch size (default 8)")
    parser.add_argument("--ts-max-batch-delay-ms", type=int, default=2, help="TorchServe batch window (default 2)")
    parser.add_argument("--json", default=None, help="write the loadgen results here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, .mar, config); kept on error")
    return parser


def ratios(summaries: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(level, resnet-serve img/s / TorchServe img/s) from loadgen's results, A and B alternating."""
    pairs = zip(summaries[0::2], summaries[1::2], strict=True)
    rates = [(float(ours["level"]), ours["throughput_img_s"], theirs["throughput_img_s"]) for ours, theirs in pairs]
    return [(level, a / b if b else math.nan) for level, a, b in rates]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    venv: Path = args.torchserve_venv
    if not (venv / "bin" / "torchserve").is_file():
        print(f"--torchserve-venv: no TorchServe in {venv}; run scripts/install-torchserve.sh first", file=sys.stderr)
        return 2
    config = TorchServeConfig(args.ts_workers, args.ts_batch_size, args.ts_max_batch_delay_ms)
    work = Path(tempfile.mkdtemp(prefix="torchserve-bench-"))
    try:
        weights_dir = work / "weights"
        weights_dir.mkdir()
        write_weights(MODEL, weights_dir, seed=0)
        (work / "store").mkdir()
        inputs = write_archive_inputs(weights_dir / f"{MODEL}.safetensors", work)
        subprocess.run(archiver_command(venv / "bin" / "torch-model-archiver", inputs, work / "store"), check=True)
        print(f"TorchServe: {config}, {worker_threads(config.workers)} threads a worker; work dir {work}", flush=True)
        results = Path(args.json) if args.json else work / "results.json"
        with (
            torchserve(venv, work, config) as ts_url,
            serving(weights_dir, work / "resnet-serve.log", *shlex.split(args.server_flags)) as ours,
        ):
            loadgen.main([
                "--url", ours.url, "--route", f"/{MODEL}/predict", "--compare", ts_url,
                "--compare-route", f"/predictions/{TS_MODEL}", "--compare-ready-path", "/ping",
                "--concurrency", args.concurrency, "--duration", str(args.duration),
                "--warmup", str(args.warmup), "--json", str(results),
            ])  # fmt: skip
        print("\nresnet-serve / TorchServe img/s (A / B):")
        for level, ratio in ratios(json.loads(results.read_text())):
            print(f"  {level:g} clients: {ratio:.2f}x")
    except BaseException:
        print(f"kept the work dir for its logs: {work}", file=sys.stderr)
        raise
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
