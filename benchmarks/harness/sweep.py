"""The server against what the machine allows, for one server configuration: start it, warm it
up, then for each concurrency a load level between two measurements of the bare forward (the
ceiling), with the decode cost on one core before and after. The ceilings and the load share the
machine, so they never run at the same time."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.ceilings import decode_ceiling
from benchmarks.harness.http import Target
from benchmarks.harness.load import LoadResult, run_level
from benchmarks.harness.machine import CpuSnapshot, other_cores, wait_for_quiet
from benchmarks.harness.server import REPO, serving, tree_cpu_s
from benchmarks.photos import Photo


@dataclass
class ServerConfig:
    name: str
    flags: list[str]
    env: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> ServerConfig:
        """`NAME:FLAGS`: server flags, and KEY=VALUE tokens for the server's environment."""
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

    def describe(self) -> str:
        text = f"fwd8 {self.fwd8_img_s:.1f} img/s, fwd1 {self.fwd1_ms:.1f} ms"
        if self.fwd8_all_cores_img_s is not None:
            text += f", fwd8 all cores {self.fwd8_all_cores_img_s:.1f} img/s"
        return text


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
    runtime: str  # what the server ran, and so whose bare forward is the ceiling
    rss_after_start_mb: float  # the server's resident memory once ready, before any request
    rss_after_load_mb: float  # and once every level has run
    decode: dict[str, Any]
    ceilings: list[CeilingPoint]
    levels: list[LevelReport]
    one_client: dict[str, float] | None = None


def model_info(url: str, model: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/models/{model}", timeout=10) as response:
        info: dict[str, Any] = json.loads(response.read())
    return info


def _forward_in_subprocess(
    model: str, threads: int, sizes: str, seconds: float, env: dict[str, str], runtime: str
) -> dict[str, Any]:
    """Forward ceilings in a fresh process with the server's environment (OMP_* and the like apply)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [
            sys.executable, "-m", "benchmarks.ceilings", "--model", model, "--threads", str(threads),
            "--batch-sizes", sizes, "--seconds", str(seconds), "--no-decode", "--json", out.name,
            "--runtime", runtime,
        ]  # fmt: skip
        subprocess.run(command, check=True, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.DEVNULL, timeout=600)
        forward: dict[str, Any] = json.loads(Path(out.name).read_text())["forward"]
    return forward


def measure_ceiling(
    model: str, threads: int, seconds: float, started: float, quiet_s: float, env: dict[str, str], runtime: str
) -> CeilingPoint:
    """The bare forward of the server's own runtime (torch or onnxruntime): its ceiling."""
    quiet = wait_for_quiet(max_wait_s=quiet_s)
    machine0 = CpuSnapshot.take()
    children0 = os.times().children_user + os.times().children_system
    forward = _forward_in_subprocess(model, threads, "8,1", seconds, env, runtime)
    all_cores = os.cpu_count() or 1
    fwd8_all = (
        _forward_in_subprocess(model, all_cores, "8", seconds, env, runtime)["8"]["img_s"]
        if threads != all_cores
        else None
    )
    children = os.times().children_user + os.times().children_system - children0
    return CeilingPoint(
        at_s=time.perf_counter() - started,
        fwd8_img_s=forward["8"]["img_s"],
        fwd8_batch_ms=forward["8"]["median_batch_ms"],
        fwd1_ms=forward["1"]["median_batch_ms"],
        fwd8_all_cores_img_s=fwd8_all,
        other_cores=other_cores(machine0, time.process_time(), children),
        quiet_before=quiet,
        fwd8_cpu_ms_per_img=forward["8"]["cpu_ms_per_img"],
    )


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


def _level_report(
    concurrency: int, load: LoadResult, before: CeilingPoint, after: CeilingPoint, other: float, quiet: float
) -> LevelReport:
    """A level against the mean of the ceilings measured just before and just after it."""
    fwd8 = (before.fwd8_img_s + after.fwd8_img_s) / 2
    fwd8_all = (
        (before.fwd8_all_cores_img_s + after.fwd8_all_cores_img_s) / 2
        if before.fwd8_all_cores_img_s is not None and after.fwd8_all_cores_img_s is not None
        else None
    )
    return LevelReport(
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
    started = time.perf_counter()
    print(f"\n== {config.name}: {' '.join(config.flags) or '(defaults)'} {config.env or ''}", flush=True)
    log = out_dir / f"server-{config.name}.log"
    with serving(
        weights_dir, log, *config.flags, model=model, env=config.env, ready_timeout_s=180, stop_timeout_s=40
    ) as server:
        target = Target(server.url, f"/{model}/predict", "data", "/metrics", name=config.name)
        info = model_info(server.url, model)
        runtime = info["runtime_details"]["name"]
        rss_start_mb = server.stats(tree=True).rss_bytes / 2**20
        print(f"   runtime: {info['runtime']}; RSS after start {rss_start_mb:.0f} MiB", flush=True)
        print(f"   batching: {info.get('batching')}", flush=True)
        if warmup_s > 0:
            await run_level(target, photos, concurrency=max(levels), duration_s=warmup_s, client=client)
        ceilings = [measure_ceiling(model, threads, ceiling_s, started, quiet_s, config.env, runtime)]
        decode = asdict(decode_ceiling(photos, seconds=ceiling_s))
        print(f"   ceiling: {ceilings[-1].describe()}; decode {decode['mean_ms']:.2f} ms/img", flush=True)
        reports: list[LevelReport] = []
        for concurrency in levels:
            quiet = await asyncio.to_thread(wait_for_quiet, max_wait_s=quiet_s)
            cpu0, machine0, server_cpu0 = time.process_time(), CpuSnapshot.take(), tree_cpu_s(server.pid)
            load = await run_level(
                target, photos, concurrency=concurrency, duration_s=duration_s, client=client, model=model
            )
            # Over the process tree rather than the server's process_cpu_seconds_total: that covers
            # one process, and with --workers the server is several.
            server_cpu = tree_cpu_s(server.pid) - server_cpu0
            if load.server is not None:
                load.server.cpu_s = server_cpu
            other = other_cores(machine0, cpu0, server_cpu)
            ceilings.append(measure_ceiling(model, threads, ceiling_s, started, quiet_s, config.env, runtime))
            report = _level_report(concurrency, load, ceilings[-2], ceilings[-1], other, quiet)
            reports.append(report)
            print(f"   c={concurrency:<3} {load.throughput:6.1f} img/s p50 {1000 * load.pct(50):6.0f} ms "
                  f"p99 {1000 * load.pct(99):6.0f} ms err {load.error_count} batch "
                  f"{report.breakdown.get('mean_batch', math.nan):.2f} | ceiling {ceilings[-1].describe()} "
                  f"| ratio {report.ratio:.2f} | other cpu {other:.2f} cores", flush=True)  # fmt: skip
        decode_after = asdict(decode_ceiling(photos, seconds=ceiling_s))
        rss_load_mb = server.stats(tree=True).rss_bytes / 2**20
    decode_ms = (decode["mean_ms"] + decode_after["mean_ms"]) / 2
    decode_summary = {**decode, "mean_ms_after": decode_after["mean_ms"], "mean_ms_avg": decode_ms}
    return ConfigReport(config.name, config.flags, config.env, threads, info, runtime, rss_start_mb, rss_load_mb,
                        decode_summary, ceilings, reports, _one_client(reports, decode_ms))  # fmt: skip


def _one_client(reports: Sequence[LevelReport], decode_ms: float) -> dict[str, float] | None:
    """The 1-client p50 against a single-image forward plus one decode, the least a request costs."""
    one = next((r for r in reports if r.concurrency == 1), None)
    if one is None:
        return None
    reference = one.fwd1_ms + decode_ms
    return {
        "p50_ms": 1000 * one.load["p50_s"],
        "fwd1_ms": one.fwd1_ms,
        "decode_ms": decode_ms,
        "reference_ms": reference,
        "ratio": 1000 * one.load["p50_s"] / reference,
    }
