"""The machine is shared: how much CPU other processes take, and waiting (bounded) for a quiet moment."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

_TICK_S = 0.01  # USER_HZ is 100 on Linux


@dataclass(frozen=True)
class CpuSnapshot:
    busy_s: float  # core-seconds spent busy by everything on the machine
    at: float

    @classmethod
    def take(cls) -> CpuSnapshot:
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except OSError:
            return cls(0.0, time.perf_counter())
        # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
        busy = sum(fields[:3]) + sum(fields[5:8])
        return cls(busy * _TICK_S, time.perf_counter())

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


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live descendants: with `--workers` the
    server is a supervisor and its worker processes."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) * _TICK_S  # utime, stime
        pending.extend(int(child) for child in children)
    return total
