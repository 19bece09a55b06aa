"""nginx with 2 backends against 1 backend directly, on this machine, in the same run.

  A  one server, directly (the server's defaults: its threads fill the machine's cores);
  B  nginx round robin over 2 servers, each with half the cores' threads (--torch-threads and
     --decode-workers = cores / 2), so that the two together ask for what A asks for;
  C  nginx in front of A's server alone: the proxy's own cost, with nothing else changed.

On a machine whose cores one server already fills, B cannot gain: two servers split the same cores,
and each batches half the requests. The figure says what the proxy costs (C against A) and what
splitting one machine in two costs (B against A). nginx is Debian's (scripts/install-nginx.sh),
with the configuration of benchmarks/harness/nginx.py (keep-alive to the backends, retries on
failure). The closed-loop load gives each target each level in turn (benchmarks/harness/compare.py).

    python -m benchmarks.proxy [--concurrency 1,16] [--duration 15]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness import nginx
from benchmarks.harness.compare import compare, report
from benchmarks.harness.http import Target
from benchmarks.harness.load import parse_levels
from benchmarks.harness.machine import describe
from benchmarks.harness.server import free_port, serving, write_weights
from benchmarks.photos import load_photos

MODEL = "resnet18v1"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,16", help="client counts, comma-separated (default 1,16)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per level and target (default 15)")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds of unmeasured load per target")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    binary = nginx.find_nginx()
    if binary is None:
        print(f"nginx is not installed; {nginx.INSTALL_HINT}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    weights_dir = work / "weights"
    weights_dir.mkdir()
    write_weights(MODEL, weights_dir, seed=0)
    machine = describe()
    print(f"machine: {machine}", flush=True)
    env = {"RESNET_SERVE_ONNX_CACHE_DIR": str(work / "onnx-cache")}
    half = str(max(1, (os.cpu_count() or 2) // 2))
    split = ("--torch-threads", half, "--decode-workers", half)
    with contextlib.ExitStack() as stack:
        whole = stack.enter_context(serving(weights_dir, work / "whole.log", env=env, ready_timeout_s=300))
        halves = [
            stack.enter_context(serving(weights_dir, work / f"half-{i}.log", *split, env=env, ready_timeout_s=300))
            for i in range(2)
        ]
        listeners = {free_port(): [h.port for h in halves], free_port(): [whole.port]}
        two, one = stack.enter_context(nginx.running(binary, work / "nginx", listeners))
        targets = [
            Target(whole.url, f"/{MODEL}/predict", name="1 backend, direct"),
            Target(two, f"/{MODEL}/predict", metrics_path=None, name="nginx, 2 backends"),
            Target(one, f"/{MODEL}/predict", metrics_path=None, name="nginx, 1 backend"),
        ]
        rows = asyncio.run(
            compare(
                targets, load_photos(), parse_levels(args.concurrency),
                duration_s=args.duration, warmup_s=args.warmup, model=MODEL,
            )
        )  # fmt: skip
    report(rows, machine, args.json)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
