"""The cost of Ray Serve's hop: the same server directly (A) and through the Ray Serve adapter (B).

Both serve the seeded random-init resnet18 (seed 0) with the server's defaults on this machine, in
the same run: A is `python -m service serve`; B is one replica of service/ray_serve.py on a local
single-node Ray (num_cpus = the machine's cores), reached through Ray Serve's HTTP proxy, which
forwards each request to the replica actor. The closed-loop load gives each target each level in
turn (benchmarks/harness/compare.py), with the CPU other processes took meanwhile.

    python -m benchmarks.ray_hop [--concurrency 1,16] [--duration 15]

Needs the `ray` extra (`pip install -e ".[ray]"`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness.compare import compare, report
from benchmarks.harness.http import Target
from benchmarks.harness.load import parse_levels
from benchmarks.harness.machine import describe
from benchmarks.harness.server import HOST, free_port, serving, wait_ready, write_weights
from benchmarks.photos import load_photos

MODEL = "resnet18v1"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_hop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,16", help="client counts, comma-separated (default 1,16)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per level and target (default 15)")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds of unmeasured load per target")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    return parser


def start_ray_serve(work: Path, weights_dir: Path) -> str:
    """A local Ray with Serve's proxy on a free port and one replica of the adapter; its base URL."""
    import ray
    from ray import serve

    from service import ray_serve

    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="warning", log_to_driver=False)
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": HOST, "port": port})
    options = ray_serve.ReplicaOptions(
        min_replicas=1,
        max_replicas=1,
        num_cpus=cores,
        settings={
            "models": [MODEL],
            "weights_dir": str(weights_dir),
            "missing_weights": "fail",
            "device": "cpu",
            "onnx_cache_dir": str(work / "onnx-cache"),
        },
    )
    serve.run(ray_serve.build(options), name="resnet-serve", route_prefix="/", blocking=False)
    url = f"http://{HOST}:{port}"
    wait_ready(url, "/health/ready", timeout_s=300)
    return url


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import ray
    except ImportError:
        print("the ray extra is not installed: pip install -e '.[ray]'", file=sys.stderr)
        return 2
    from ray import serve

    work = Path(tempfile.mkdtemp(prefix="ray-hop-"))
    weights_dir = work / "weights"
    weights_dir.mkdir()
    write_weights(MODEL, weights_dir, seed=0)
    machine = describe()
    print(f"machine: {machine}", flush=True)
    env = {"RESNET_SERVE_ONNX_CACHE_DIR": str(work / "onnx-cache")}
    try:
        with serving(weights_dir, work / "direct.log", env=env, ready_timeout_s=300) as direct:
            ray_url = start_ray_serve(work, weights_dir)
            targets = [
                Target(direct.url, f"/{MODEL}/predict", name="direct"),
                Target(ray_url, f"/{MODEL}/predict", name="ray-serve"),
            ]
            rows = asyncio.run(
                compare(
                    targets, load_photos(), parse_levels(args.concurrency),
                    duration_s=args.duration, warmup_s=args.warmup, model=MODEL,
                )
            )  # fmt: skip
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    report(rows, machine, args.json)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
