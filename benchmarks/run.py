"""One command: weights, ceilings, the server under load at several concurrencies, a table, JSON and a plot.

For each server configuration (`--config NAME:FLAGS`, repeatable):
  1. start `python -m service serve` with those flags (random-init weights in a temp dir), wait for /ping;
  2. warm up with unmeasured load;
  3. with the server idle, measure the ceilings: bare forward at batch 8 and 1 on the server's
     torch threads (plus all cores when that differs), and decode+preprocess on one core;
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
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.ceilings import decode_ceiling
from benchmarks.loadgen import LoadResult, Target, parse_levels, run_level, wait_ready
from benchmarks.noise import CpuSnapshot, process_tree_cpu_s, wait_for_quiet
from benchmarks.photos import Photo, load_photos

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
NOISY_CORES = 0.15


@dataclass
class ServerConfig:
    name: str
    flags: list[str]
    env: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> ServerConfig:
        name, _, rest = text.partition(":")
        flags: list[str] = []
        env: dict[str, str] = {}
        for token in shlex.split(rest):
            key, eq, value = token.partition("=")
            if eq and not token.startswith("-") and key.isupper():
                env[key] = value
            else:
                flags.append(token)
        return cls(name.strip() or "default", flags, env)

    def flag(self, name: str) -> str | None:
        for index, token in enumerate(self.flags):
            if token == name and index + 1 < len(self.flags):
                return self.flags[index + 1]
            if token.startswith(name + "="):
                return token.split("=", 1)[1]
        return None

    @property
    def torch_threads(self) -> int:
        value = self.flag("--torch-threads") or self.env.get("RESNET_SERVE_TORCH_THREADS")
        return int(value) if value else os.cpu_count() or 1  # the server's CPU default: every core


@dataclass
class CeilingPoint:
    """Forward ceilings measured at one moment, the server idle."""

    at_s: float
    fwd8_img_s: float
    fwd8_batch_ms: float
    fwd1_ms: float
    fwd8_all_cores_img_s: float | None = None
    other_cores: float = 0.0  # CPU taken by other processes on the machine meanwhile
    quiet_before: float = 0.0  # busy cores just before (after waiting for quiet)
    fwd8_cpu_ms_per_img: float = 0.0


@dataclass
class LevelReport:
    concurrency: int
    load: dict[str, Any]
    fwd8_ceiling_img_s: float
    fwd8_all_cores_img_s: float | None
    fwd1_ms: float
    fwd8_cpu_ms_per_img: float
    ratio: float
    ratio_all_cores: float | None
    breakdown: dict[str, float] = field(default_factory=dict)
    other_cores: float = 0.0
    quiet_before: float = 0.0


@dataclass
class ConfigReport:
    name: str
    flags: list[str]
    env: dict[str, str]
    torch_threads: int
    model_info: dict[str, Any]
    decode: dict[str, Any]
    ceilings: list[CeilingPoint]
    levels: list[LevelReport]
    one_client: dict[str, float] | None = None


# -- the server process ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_weights(model: str, directory: Path) -> None:
    command = [sys.executable, "-m", "service", "weights", "random", model, "--seed", "0", "--dir", str(directory)]
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def server_process(model: str, weights_dir: Path, config: ServerConfig, log_path: Path, port: int) -> Any:
    command = [
        sys.executable, "-m", "service", "serve", "--models", model, "--weights-dir", str(weights_dir),
        "--port", str(port), *config.flags,
    ]  # fmt: skip
    env = {**os.environ, **config.env}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(f"http://127.0.0.1:{port}", "/ping", timeout_s=180)
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)


def model_info(url: str, model: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/models/{model}", timeout=10) as response:
        info: dict[str, Any] = json.loads(response.read())
    return info


# -- measurement ----------------------------------------------------------------------------------


def _forward_in_subprocess(model: str, threads: int, sizes: str, seconds: float, env: dict[str, str]) -> dict[str, Any]:
    """Forward ceilings in a fresh process with the server's environment (OMP_* and the like apply)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [
            sys.executable, "-m", "benchmarks.ceilings", "--model", model, "--threads", str(threads),
            "--batch-sizes", sizes, "--seconds", str(seconds), "--no-decode", "--json", out.name,
        ]  # fmt: skip
        subprocess.run(command, check=True, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.DEVNULL, timeout=600)
        forward: dict[str, Any] = json.loads(Path(out.name).read_text())["forward"]
    return forward


def measure_ceiling(
    model: str, threads: int, seconds: float, started: float, quiet_s: float, env: dict[str, str]
) -> CeilingPoint:
    quiet = wait_for_quiet(max_wait_s=quiet_s)
    machine0 = CpuSnapshot.take()
    children0 = os.times().children_user + os.times().children_system
    forward = _forward_in_subprocess(model, threads, "8,1", seconds, env)
    all_cores = os.cpu_count() or 1
    fwd8_all = (
        _forward_in_subprocess(model, all_cores, "8", seconds, env)["8"]["img_s"] if threads != all_cores else None
    )
    children = os.times().children_user + os.times().children_system - children0
    return CeilingPoint(
        at_s=time.perf_counter() - started,
        fwd8_img_s=forward["8"]["img_s"],
        fwd8_batch_ms=forward["8"]["median_batch_ms"],
        fwd1_ms=forward["1"]["median_batch_ms"],
        fwd8_all_cores_img_s=fwd8_all,
        other_cores=_other_cores(machine0, time.process_time(), children),
        quiet_before=quiet,
        fwd8_cpu_ms_per_img=forward["8"]["cpu_ms_per_img"],
    )


def _other_cores(machine0: CpuSnapshot, cpu0: float, own_cpu_s: float = 0.0) -> float:
    machine1 = CpuSnapshot.take()
    own = time.process_time() - cpu0 + own_cpu_s
    return max(0.0, machine1.cores_since(machine0) - own / max(1e-9, machine1.at - machine0.at))


def breakdown(load: LoadResult) -> dict[str, float]:
    """Mean time of a request (ms) split by the server's own histograms; the rest is HTTP/overhead."""
    server = load.server
    if server is None or not server.requests:
        return {}
    client_ms = 1000 * load.mean_latency_s
    request_ms = 1000 * server.mean_request_s
    preprocess_ms = 1000 * server.mean_preprocess_s
    wait_ms = 1000 * server.mean_queue_wait_s
    inference_ms = 1000 * server.mean_inference_per_batch_s
    return {
        "client_mean_ms": client_ms,
        "server_request_mean_ms": request_ms,
        "preprocess_ms": preprocess_ms,
        "queue_wait_ms": wait_ms,
        "inference_per_batch_ms": inference_ms,
        "server_rest_ms": request_ms - preprocess_ms - wait_ms - inference_ms,
        "outside_server_ms": client_ms - request_ms,
        "forward_busy_pct": 100 * server.inference_busy_s / load.elapsed_s,
        "decode_core_pct": 100 * server.preprocess_busy_s / load.elapsed_s,
        "server_cpu_pct": 100 * server.cpu_s / load.elapsed_s,
        "generator_cpu_pct": 100 * load.generator_cpu_s / load.elapsed_s,
        "mean_batch": server.mean_batch,
        "server_cpu_ms_per_img": 1000 * server.cpu_s / server.images if server.images else math.nan,
    }


async def run_config(
    config: ServerConfig,
    *,
    model: str,
    weights_dir: Path,
    levels: Sequence[int],
    duration_s: float,
    warmup_s: float,
    ceiling_s: float,
    photos: Sequence[Photo],
    out_dir: Path,
    client: str,
    quiet_s: float,
) -> ConfigReport:
    threads = config.torch_threads
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    target = Target(url, f"/{model}/predict", "data", "/metrics", name=config.name)
    started = time.perf_counter()
    print(f"\n== {config.name}: {' '.join(config.flags) or '(defaults)'} {config.env or ''}", flush=True)
    with server_process(model, weights_dir, config, out_dir / f"server-{config.name}.log", port) as process:
        info = model_info(url, model)
        print(f"   batching: {info.get('batching')}", flush=True)
        if warmup_s > 0:
            await run_level(target, photos, concurrency=max(levels), duration_s=warmup_s, client=client)
        ceilings = [measure_ceiling(model, threads, ceiling_s, started, quiet_s, config.env)]
        decode = asdict(decode_ceiling(photos, seconds=ceiling_s))
        print(f"   ceiling: {_fmt_ceiling(ceilings[-1])}; decode {decode['mean_ms']:.2f} ms/img", flush=True)
        reports: list[LevelReport] = []
        for concurrency in levels:
            quiet = await asyncio.to_thread(wait_for_quiet, max_wait_s=quiet_s)
            cpu0, machine0, server_cpu0 = time.process_time(), CpuSnapshot.take(), process_tree_cpu_s(process.pid)
            load = await run_level(
                target, photos, concurrency=concurrency, duration_s=duration_s, client=client, model=model
            )
            # From /proc rather than the server's process_cpu_seconds_total: that covers one process,
            # and with --workers the server is several.
            server_cpu = process_tree_cpu_s(process.pid) - server_cpu0
            if load.server is not None:
                load.server.cpu_s = server_cpu
            other = _other_cores(machine0, cpu0, server_cpu)
            ceilings.append(measure_ceiling(model, threads, ceiling_s, started, quiet_s, config.env))
            before, after = ceilings[-2], ceilings[-1]
            fwd8 = (before.fwd8_img_s + after.fwd8_img_s) / 2
            fwd8_all = (
                (before.fwd8_all_cores_img_s + after.fwd8_all_cores_img_s) / 2
                if before.fwd8_all_cores_img_s is not None and after.fwd8_all_cores_img_s is not None
                else None
            )
            report = LevelReport(
                concurrency=concurrency,
                load=load.summary(),
                fwd8_ceiling_img_s=fwd8,
                fwd8_all_cores_img_s=fwd8_all,
                fwd1_ms=(before.fwd1_ms + after.fwd1_ms) / 2,
                fwd8_cpu_ms_per_img=(before.fwd8_cpu_ms_per_img + after.fwd8_cpu_ms_per_img) / 2,
                ratio=load.throughput / fwd8,
                ratio_all_cores=load.throughput / fwd8_all if fwd8_all else None,
                breakdown=breakdown(load),
                other_cores=other,
                quiet_before=quiet,
            )
            reports.append(report)
            print(f"   c={concurrency:<3} {load.throughput:6.1f} img/s p50 {1000 * load.pct(50):6.0f} ms "
                  f"p99 {1000 * load.pct(99):6.0f} ms err {load.error_count} batch "
                  f"{report.breakdown.get('mean_batch', math.nan):.2f} | ceiling {_fmt_ceiling(after)} "
                  f"| ratio {report.ratio:.2f} | other cpu {other:.2f} cores", flush=True)  # fmt: skip
        decode_after = asdict(decode_ceiling(photos, seconds=ceiling_s))
    decode_ms = (decode["mean_ms"] + decode_after["mean_ms"]) / 2
    decode_summary = {**decode, "mean_ms_after": decode_after["mean_ms"], "mean_ms_avg": decode_ms}
    one = next((r for r in reports if r.concurrency == 1), None)
    one_client = None
    if one is not None:
        reference = one.fwd1_ms + decode_ms
        one_client = {
            "p50_ms": 1000 * one.load["p50_s"],
            "fwd1_ms": one.fwd1_ms,
            "decode_ms": decode_ms,
            "reference_ms": reference,
            "ratio": 1000 * one.load["p50_s"] / reference,
        }
    return ConfigReport(config.name, config.flags, config.env, threads, info, decode_summary, ceilings, reports,
                        one_client)  # fmt: skip


def _fmt_ceiling(point: CeilingPoint) -> str:
    text = f"fwd8 {point.fwd8_img_s:.1f} img/s, fwd1 {point.fwd1_ms:.1f} ms"
    if point.fwd8_all_cores_img_s is not None:
        text += f", fwd8 all cores {point.fwd8_all_cores_img_s:.1f} img/s"
    return text


# -- reporting ------------------------------------------------------------------------------------


def format_tables(reports: Sequence[ConfigReport]) -> str:
    head = (
        f"{'config':<12} {'conc':>4} {'img/s':>6} {'p50':>6} {'p99':>6} {'err':>4} {'batch':>5} "
        f"{'fwd8':>6} {'ratio':>5} {'r/all':>5} {'srvCPU':>6} {'genCPU':>6} {'other':>5}"
    )
    lines = ["Throughput and latency (ms); ratio = server img/s / bare batch-8 forward img/s (same threads,",
             "mean of the ceilings just before and after the level); r/all = against all cores' forward;",
             f"other = busy cores taken by other processes during the level ('!' over {NOISY_CORES}: noisy)",
             head, "-" * len(head)]  # fmt: skip
    for report in reports:
        for level in report.levels:
            load, b = level.load, level.breakdown
            ratio_all = f"{level.ratio_all_cores:.2f}" if level.ratio_all_cores is not None else "-"
            lines.append(
                f"{report.name:<12} {level.concurrency:>4} {load['throughput_img_s']:6.1f} {1000 * load['p50_s']:6.0f}"
                f" {1000 * load['p99_s']:6.0f} {sum(load['errors'].values()):>4} {b.get('mean_batch', math.nan):5.2f}"
                f" {level.fwd8_ceiling_img_s:6.1f} {level.ratio:5.2f} {ratio_all:>5}"
                f" {b.get('server_cpu_pct', math.nan):5.0f}% {b.get('generator_cpu_pct', math.nan):5.1f}%"
                f" {level.other_cores:5.2f}{' !' if level.other_cores > NOISY_CORES else ''}"
            )
    lines.append("")
    head2 = (
        f"{'config':<12} {'conc':>4} {'client':>7} {'server':>7} {'decode':>7} {'q-wait':>7} {'fwd/bat':>7} "
        f"{'rest':>6} {'outside':>7} {'fwdBusy':>7} {'decCore':>7} {'cpu/img':>7} {'fwd cpu':>7}"
    )
    lines += ["Where the time goes: mean ms per request (decode and queue wait per image, forward per batch;",
              "rest = server time not in those = HTTP parsing, decode-pool wait, top-k, JSON; outside = client",
              "latency minus server-measured time = sockets and the server's event loop before the handler);",
              "fwdBusy = % of wall time a forward was running; decCore = decode core-seconds per second, in %;",
              "cpu/img = server CPU ms per image (all threads), fwd cpu = bare batch-8 forward CPU ms per image:",
              "CPU time per image is far steadier than img/s when other processes share the cores",
              head2, "-" * len(head2)]  # fmt: skip
    for report in reports:
        for level in report.levels:
            b = level.breakdown
            if not b:
                continue
            lines.append(
                f"{report.name:<12} {level.concurrency:>4} {b['client_mean_ms']:7.1f}"
                f" {b['server_request_mean_ms']:7.1f}"
                f" {b['preprocess_ms']:7.1f} {b['queue_wait_ms']:7.1f} {b['inference_per_batch_ms']:7.1f}"
                f" {b['server_rest_ms']:6.1f} {b['outside_server_ms']:7.1f} {b['forward_busy_pct']:6.0f}%"
                f" {b['decode_core_pct']:6.0f}% {b['server_cpu_ms_per_img']:7.1f} {level.fwd8_cpu_ms_per_img:7.1f}"
            )
    lines.append("")
    for report in reports:
        if report.one_client is not None:
            o = report.one_client
            lines.append(
                f"{report.name}: 1-client p50 {o['p50_ms']:.1f} ms vs single-image forward {o['fwd1_ms']:.1f} ms + "
                f"decode {o['decode_ms']:.1f} ms = {o['reference_ms']:.1f} ms -> ratio {o['ratio']:.2f}"
            )
    return "\n".join(lines)


def plot(reports: Sequence[ConfigReport], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    ceilings: list[float] = []
    for report in reports:
        xs = [lv.load["throughput_img_s"] for lv in report.levels]
        p50 = [1000 * lv.load["p50_s"] for lv in report.levels]
        p99 = [1000 * lv.load["p99_s"] for lv in report.levels]
        (line,) = ax.plot(xs, p50, marker="o", label=f"{report.name} p50")
        ax.plot(xs, p99, marker="x", linestyle="--", color=line.get_color(), alpha=0.6, label=f"{report.name} p99")
        for lv, x, y in zip(report.levels, xs, p50, strict=True):
            ax.annotate(f"c={lv.concurrency}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        # the all-cores forward is the machine's ceiling, whatever threads a config gave the server
        ceilings += [lv.fwd8_all_cores_img_s or lv.fwd8_ceiling_img_s for lv in report.levels]
    if ceilings:
        ceiling = statistics.median(ceilings)
        ax.axvline(ceiling, color="grey", linestyle=":", label=f"bare forward b8, all cores ~{ceiling:.1f} img/s")
        ax.axvline(0.85 * ceiling, color="grey", linestyle="-.", alpha=0.5, label="0.85 x forward")
    ax.set_xlabel("throughput (img/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "service"], capture_output=True, text=True,
                               cwd=REPO)  # fmt: skip
        info["commit"] = commit.stdout.strip() + ("+dirty-service" if dirty.stdout.strip() else "")
    import torch

    info["torch"] = torch.__version__
    info["torch_config_parallel"] = torch.__config__.parallel_info().splitlines()[:6]
    return info


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18v1")
    parser.add_argument("--concurrency", default="1,4,16", help="closed-loop client counts")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per level")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of unmeasured load per config")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0, help="seconds per ceiling measurement")
    parser.add_argument(
        "--config", action="append", default=None, metavar="NAME:FLAGS",
        help="a server configuration (repeatable); default: one, with the server's defaults",
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
    configs = [ServerConfig.parse(text) for text in (args.config or ["default:"])]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir: Path = args.out or RESULTS / (stamp + (f"-{args.tag}" if args.tag else ""))
    out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    photos = load_photos()
    print(f"photo mix: {', '.join(p.label for p in photos)}")
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv, **machine()}
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
