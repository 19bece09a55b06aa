"""The machine is shared: how much CPU other processes take, a bounded wait for a quiet moment, and
what the machine is (for the results file)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class CpuSnapshot:
    busy_s: float  # core-seconds spent busy by everything on the machine
    at: float

    @classmethod
    def take(cls) -> CpuSnapshot:
        times = psutil.cpu_times()
        # busy = all but idle and iowait (guest time is already inside user and nice)
        busy = sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))
        return cls(busy, time.perf_counter())

    def cores_since(self, earlier: CpuSnapshot) -> float:
        """Mean busy cores over the interval (all processes)."""
        return (self.busy_s - earlier.busy_s) / max(1e-9, self.at - earlier.at)


def busy_cores(interval_s: float = 1.0) -> float:
    first = CpuSnapshot.take()
    time.sleep(interval_s)
    return CpuSnapshot.take().cores_since(first)


def wait_for_quiet(threshold_cores: float = 0.3, max_wait_s: float = 60.0, interval_s: float = 1.0) -> float:
    """Wait until the machine's busy cores fall below `threshold_cores`, at most `max_wait_s`.

    Returns the last reading, so the caller can record how noisy the start was."""
    deadline = time.monotonic() + max_wait_s
    reading = busy_cores(interval_s)
    while reading > threshold_cores and time.monotonic() < deadline:
        reading = busy_cores(interval_s)
    return reading


def other_cores(machine0: CpuSnapshot, cpu0: float, own_cpu_s: float = 0.0) -> float:
    """Busy cores since `machine0` that were not this process (CPU since `cpu0`) or `own_cpu_s`."""
    machine1 = CpuSnapshot.take()
    own = time.process_time() - cpu0 + own_cpu_s
    return max(0.0, machine1.cores_since(machine0) - own / max(1e-9, machine1.at - machine0.at))


def describe() -> dict[str, Any]:
    """Cores, CPU model, Python, torch and its threading, and the commit (dirty if service/ is)."""
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
