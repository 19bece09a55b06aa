"""The tables (and the plot) the benchmark scripts print and write."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.harness.load import LoadResult
    from benchmarks.harness.sweep import ConfigReport

NOISY_CORES = 0.15


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def format_results(results: Sequence[LoadResult]) -> str:
    header = (
        f"{'target':<34} {'mode':<6} {'level':>6} {'img/s':>7} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6}"
        f" {'ok':>6} {'errors':<16} {'batch':>5} {'gen cpu':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        errors = ",".join(f"{k}:{v}" for k, v in sorted(r.errors.items())) or "0"
        batch = f"{r.server.mean_batch:.2f}" if r.server is not None and r.server.batches else "-"
        level = f"{r.level:g}" + ("/s" if r.mode == "open" else "")
        lines.append(
            f"{r.target[-34:]:<34} {r.mode:<6} {level:>6} {r.throughput:7.1f} {_ms(r.pct(50)):>6} {_ms(r.pct(90)):>6}"
            f" {_ms(r.pct(99)):>6} {_ms(r.latencies_s[-1] if r.latencies_s else math.nan):>6} {r.ok:>6}"
            f" {errors:<16} {batch:>5} {100 * r.generator_cpu_s / r.elapsed_s:6.1f}%"
        )
    lines.append("latencies in ms; batch = mean images per forward from the server's /metrics; gen cpu = this process")
    return "\n".join(lines)


def format_side_by_side(pairs: Sequence[tuple[LoadResult, LoadResult]]) -> str:
    a_name, b_name = pairs[0][0].target, pairs[0][1].target
    lines = [f"A = {a_name}", f"B = {b_name}"]
    header = (
        f"{'level':>7} | {'A img/s':>8} {'A p50':>6} {'A p99':>6} {'A err':>5} | "
        f"{'B img/s':>8} {'B p50':>6} {'B p99':>6} {'B err':>5} | {'B/A img/s':>9}"
    )
    lines += [header, "-" * len(header)]
    for a, b in pairs:
        level = f"{a.level:g}" + ("/s" if a.mode == "open" else "")
        ratio = b.throughput / a.throughput if a.throughput else math.nan
        lines.append(
            f"{level:>7} | {a.throughput:8.1f} {_ms(a.pct(50)):>6} {_ms(a.pct(99)):>6} {a.error_count:>5} | "
            f"{b.throughput:8.1f} {_ms(b.pct(50)):>6} {_ms(b.pct(99)):>6} {b.error_count:>5} | {ratio:9.2f}"
        )
    return "\n".join(lines)


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
    lines.append("")
    for report in reports:
        lines.append(
            f"{report.name}: runtime {report.model_info.get('runtime', report.runtime)} (its bare forward is the "
            f"ceiling); server RSS {report.rss_after_start_mb:.0f} MiB after start, "
            f"{report.rss_after_load_mb:.0f} MiB after the load"
        )
    return "\n".join(lines)


def plot(reports: Sequence[ConfigReport], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for report in reports:
        xs = [lv.load["throughput_img_s"] for lv in report.levels]
        p50 = [1000 * lv.load["p50_s"] for lv in report.levels]
        p99 = [1000 * lv.load["p99_s"] for lv in report.levels]
        (line,) = ax.plot(xs, p50, marker="o", label=f"{report.name} p50")
        ax.plot(xs, p99, marker="x", linestyle="--", color=line.get_color(), alpha=0.6, label=f"{report.name} p99")
        for lv, x, y in zip(report.levels, xs, p50, strict=True):
            ax.annotate(f"c={lv.concurrency}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        # Each config against its own runtime's bare forward on all cores: the machine's ceiling for it.
        ceilings = [lv.fwd8_all_cores_img_s or lv.fwd8_ceiling_img_s for lv in report.levels]
        if ceilings:
            ceiling = statistics.median(ceilings)
            ax.axvline(ceiling, color=line.get_color(), linestyle=":",
                       label=f"{report.name}: bare {report.runtime} forward b8 ~{ceiling:.1f} img/s")  # fmt: skip
    ax.set_xlabel("throughput (img/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
