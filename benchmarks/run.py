"""One command: weights, ceilings, the server under load at several concurrencies, a table, JSON and a plot.

For each server configuration (`--config NAME:FLAGS`, repeatable; by default torch and onnxruntime):
  1. start `python -m service serve` with those flags (random-init weights in a temp dir), wait for /ping;
  2. warm up with unmeasured load;
  3. with the server idle, measure the ceilings: the bare forward of the server's runtime (torch or
     onnxruntime) at batch 8 and 1 on the server's threads (plus all cores when that differs), and
     decode+preprocess on one core;
  4. for each concurrency: closed-loop load for `--duration` s, then the forward ceilings again,
     so each level sits between two ceiling measurements and its ratio uses their mean;
  5. stop the server.
The ceilings and the load share the machine, so they never run at the same time.

Example:
  python -m benchmarks.run --model resnet18v1 --concurrency 1,4,16 --duration 20
  python -m benchmarks.run --concurrency 16 --duration 15 \\
      --config "default:" --config "b16:--max-batch-size 16" --config "t1:--torch-threads 1 --decode-workers 1"
A config's FLAGS are `resnet-serve serve` flags; a token KEY=VALUE sets an environment variable
of the server process (e.g. OMP_WAIT_POLICY=PASSIVE).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from benchmarks.harness.load import parse_levels
from benchmarks.harness.machine import describe
from benchmarks.harness.report import format_tables, plot
from benchmarks.harness.server import REPO, write_weights
from benchmarks.harness.sweep import ConfigReport, ServerConfig, run_config
from benchmarks.photos import load_photos

RESULTS = REPO / "benchmarks" / "results"
# Each runtime with the server's other defaults, each against its own bare forward.
DEFAULT_CONFIGS = ("torch:--runtime torch", "onnxruntime:--runtime onnxruntime")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18v1")
    parser.add_argument("--concurrency", default="1,4,16", help="closed-loop client counts")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per level")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of unmeasured load per config")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0, help="seconds per ceiling measurement")
    parser.add_argument(
        "--config", action="append", default=None, metavar="NAME:FLAGS",
        help="a server configuration (repeatable); default: torch and onnxruntime side by side",
    )  # fmt: skip
    parser.add_argument(
        "--quiet-wait", type=float, default=45.0,
        help="before each measurement, wait up to this many seconds for other processes to go quiet",
    )  # fmt: skip
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<time>)")
    parser.add_argument("--tag", default="", help="a word added to the results folder name")
    return parser


async def _main_async(args: argparse.Namespace) -> int:
    levels = parse_levels(args.concurrency)
    configs = [ServerConfig.parse(text) for text in (args.config or DEFAULT_CONFIGS)]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir: Path = args.out or RESULTS / (stamp + (f"-{args.tag}" if args.tag else ""))
    out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    photos = load_photos()
    print(f"photo mix: {', '.join(p.label for p in photos)}")
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv, **describe()}
    reports: list[ConfigReport] = []
    with tempfile.TemporaryDirectory(prefix="resnet-serve-bench-") as weights:
        write_weights(args.model, Path(weights))
        for config in configs:
            reports.append(
                await run_config(
                    config,
                    model=args.model,
                    weights_dir=Path(weights),
                    levels=levels,
                    duration_s=args.duration,
                    warmup_s=args.warmup,
                    ceiling_s=args.ceiling_seconds,
                    photos=photos,
                    out_dir=out_dir,
                    client=args.client,
                    quiet_s=args.quiet_wait,
                )
            )
            # Write as we go: a long sweep that dies late keeps what it measured.
            (out_dir / "results.json").write_text(
                json.dumps({"meta": meta, "configs": [asdict(r) for r in reports]}, indent=2, default=str)
            )
    table = format_tables(reports)
    print("\n" + table)
    (out_dir / "table.txt").write_text(table + "\n")
    title = f"{args.model} on {meta.get('cpu', '?')} ({meta['cores']} cores), {meta['date']}, {meta.get('commit', '')}"
    plot(reports, out_dir / "latency_vs_throughput.png", title)
    print(f"\nresults: {out_dir}/results.json, table.txt, latency_vs_throughput.png")
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Unwind (and so stop the server subprocess) on SIGTERM as on Ctrl-C.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return asyncio.run(_main_async(_parser().parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
