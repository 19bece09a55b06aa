"""HTTP load generator for image-classification servers (resnet-serve, TorchServe, LitServe, ...).

Closed loop: N clients, each sends its next request as soon as its previous answer arrived.
Open loop: requests arrive at a fixed rate (Poisson or uniform), whatever the server's pace; latency
counts from the scheduled arrival, so a slow server cannot hide its queue (no coordinated omission).

Every request uploads one photo of the mix (benchmarks/photos.py) as multipart/form-data. The
default client is a minimal HTTP/1.1 keep-alive client on raw asyncio streams: each request body is
built once, so the generator spends a few tens of microseconds of CPU a request (`--client httpx`
for comparison; the report prints the generator's CPU use so you can see it is not the bottleneck).

Examples:
  python -m benchmarks.loadgen --url http://127.0.0.1:8080 --concurrency 1,4,16 --duration 15
  python -m benchmarks.loadgen --url http://127.0.0.1:8080 --rate 20 --duration 15 --arrival poisson
  python -m benchmarks.loadgen --url http://127.0.0.1:8080 --route /resnet18v1/predict \\
      --compare http://127.0.0.1:8081 --compare-route /predictions/resnet18 --concurrency 1,16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness.http import Target
from benchmarks.harness.load import LoadResult, parse_levels, run_level
from benchmarks.harness.report import format_results, format_side_by_side
from benchmarks.harness.server import wait_ready
from benchmarks.photos import load_photos


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="base URL of the server (A)")
    parser.add_argument("--route", default="/resnet18v1/predict", help="prediction route of A")
    parser.add_argument("--field", default="data", help="multipart field of the image for A")
    parser.add_argument("--metrics-path", default="/metrics", help="Prometheus route of A ('' for none)")
    parser.add_argument("--model", default=None, help="model label to read from /metrics (default: all)")
    parser.add_argument("--compare", default=None, help="base URL of a second server (B) given the same load")
    parser.add_argument("--compare-route", default=None, help="prediction route of B (default: A's)")
    parser.add_argument("--compare-field", default=None, help="multipart field of B (default: A's)")
    parser.add_argument("--compare-metrics-path", default="", help="Prometheus route of B (default: none)")
    parser.add_argument("--ready-path", default="/ping", help="readiness route of A, waited on first")
    parser.add_argument("--compare-ready-path", default="/ping", help="readiness route of B (LitServe: /health)")
    parser.add_argument("--concurrency", default="1,4,16", help="closed loop: comma-separated client counts")
    parser.add_argument("--rate", type=float, default=None, help="open loop instead: arrivals a second")
    parser.add_argument("--arrival", choices=("poisson", "uniform"), default="poisson")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per level (default 15)")
    parser.add_argument("--requests", type=int, default=None, help="stop a level after this many requests")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first (default 3)")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--processes", type=int, default=1, help="generator processes sharing the clients or the rate (default 1)"
    )
    return parser


async def _main_async(args: argparse.Namespace) -> int:
    photos = load_photos()
    a = Target(args.url, args.route, args.field, args.metrics_path or None, name="A " + args.url + args.route)
    targets = [a]
    if args.compare:
        route = args.compare_route or args.route
        b = Target(
            args.compare, route, args.compare_field or args.field, args.compare_metrics_path or None,
            name="B " + args.compare + route,
        )  # fmt: skip
        targets.append(b)
    for target, ready_path in zip(targets, (args.ready_path, args.compare_ready_path), strict=False):
        wait_ready(target.url, ready_path, timeout_s=30, interval_s=0.25)
        if args.warmup > 0:
            await run_level(target, photos, concurrency=4, duration_s=args.warmup, client=args.client)
    levels: list[tuple[int | None, float | None]] = (
        [(None, args.rate)] if args.rate is not None else [(c, None) for c in parse_levels(args.concurrency)]
    )
    results: list[LoadResult] = []
    pairs: list[tuple[LoadResult, LoadResult]] = []
    for concurrency, rate in levels:
        row = []
        for target in targets:
            result = await run_level(
                target, photos, concurrency=concurrency, rate=rate, duration_s=args.duration,
                max_requests=args.requests, arrival=args.arrival, client=args.client, model=args.model,
                seed=args.seed, processes=args.processes,
            )  # fmt: skip
            row.append(result)
            results.append(result)
            print(format_results([result]).splitlines()[2], flush=True)
        if len(row) == 2:
            pairs.append((row[0], row[1]))
    print()
    print(format_results(results))
    if pairs:
        print()
        print(format_side_by_side(pairs))
    if args.json:
        Path(args.json).write_text(json.dumps([r.summary() for r in results], indent=2, default=str))  # noqa: ASYNC240
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if os.environ.get("PYTHONASYNCIODEBUG"):
        print("warning: asyncio debug mode slows the generator down", file=sys.stderr)
    return asyncio.run(_main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
