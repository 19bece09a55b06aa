"""Two or more targets given the same closed-loop load, level by level and in turn, on this shared
machine: each level's result with the CPU that other processes took meanwhile (`other cpu`), so a
figure measured beside someone else's work says so."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness.http import Target
from benchmarks.harness.load import LoadResult, run_level
from benchmarks.harness.machine import CpuSnapshot, wait_for_quiet
from benchmarks.harness.report import format_results
from benchmarks.harness.server import tree_cpu_s
from benchmarks.photos import Photo


@dataclass
class Measured:
    result: LoadResult
    other_cores: float  # busy cores outside this process's tree (generator, servers, proxies) meanwhile
    quiet_cores: float  # the machine's busy cores just before the level


def _other_cores(machine0: CpuSnapshot, tree0: float) -> float:
    """Busy cores since `machine0` that were not this process or its descendants: every server,
    proxy and Ray process these scripts measure is started from here."""
    machine1 = CpuSnapshot.take()
    elapsed = max(1e-9, machine1.at - machine0.at)
    return max(0.0, machine1.cores_since(machine0) - (tree_cpu_s(os.getpid()) - tree0) / elapsed)


async def compare(
    targets: Sequence[Target],
    photos: Sequence[Photo],
    levels: Sequence[int],
    *,
    duration_s: float,
    warmup_s: float,
    model: str,
    quiet_wait_s: float = 20.0,
) -> list[list[Measured]]:
    """For each level, each target in turn: rows of measurements, one row a level."""
    for target in targets:
        if warmup_s > 0:
            await run_level(target, photos, concurrency=4, duration_s=warmup_s)
    rows: list[list[Measured]] = []
    for level in levels:
        row: list[Measured] = []
        for target in targets:
            quiet = wait_for_quiet(max_wait_s=quiet_wait_s)
            machine0, tree0 = CpuSnapshot.take(), tree_cpu_s(os.getpid())
            result = await run_level(target, photos, concurrency=level, duration_s=duration_s, model=model)
            measured = Measured(result, _other_cores(machine0, tree0), quiet)
            row.append(measured)
            line = format_results([result]).splitlines()[2]
            print(f"{line} | other cpu {measured.other_cores:.2f} cores", flush=True)
        rows.append(row)
    return rows


def format_comparison(rows: Sequence[Sequence[Measured]]) -> str:
    """Per level: each target's img/s, p50 and p99, `other cpu`, and its img/s over the first target's."""
    names = [m.result.target for m in rows[0]]
    lines = [f"{chr(ord('A') + i)} = {name}" for i, name in enumerate(names)]
    header = (
        f"{'clients':>7} {'target':>6} {'img/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'other':>6} {'/A':>5}"
    )
    lines += [header, "-" * len(header)]
    for row in rows:
        base = row[0].result.throughput
        for i, m in enumerate(row):
            r = m.result
            lines.append(
                f"{r.level:7g} {chr(ord('A') + i):>6} {r.throughput:7.1f} {r.pct(50) * 1000:7.0f}"
                f" {r.pct(99) * 1000:7.0f} {r.error_count:6d} {m.other_cores:6.2f} {r.throughput / base:5.2f}"
            )
    lines.append("other = busy cores taken by processes outside this benchmark during the level")
    return "\n".join(lines)


def report(rows: Sequence[Sequence[Measured]], machine: Any, json_path: str | None) -> None:
    """Print the comparison table; with `json_path`, also write every level's summary there."""
    print()
    print(format_comparison(rows))
    if json_path:
        summaries = [[{**m.result.summary(), "other_cores": m.other_cores} for m in row] for row in rows]
        Path(json_path).write_text(json.dumps({"machine": machine, "levels": summaries}, indent=2, default=str))
