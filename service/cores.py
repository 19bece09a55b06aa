"""How many CPUs this process may really use: the affinity mask and the cgroup CPU quota.

`os.cpu_count()` counts the host's cores: in a pod limited to 2 CPUs on a 64-core node it says 64,
and 64 torch threads then fight over 2 CPUs' worth of time slices. The thread defaults use this instead.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_OWN_CGROUPS = Path("/proc/self/cgroup")


def usable_cpus(cgroup_root: Path | None = None) -> int:
    """CPUs in this process's affinity mask, capped by its cgroup's CPU quota (rounded up); at least 1."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root or CGROUP_ROOT)
    if quota is not None:
        count = min(count, quota)
    return max(1, count)


def cgroup_cpu_quota(root: Path) -> int | None:
    """The CPUs the CFS quota allows (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), rounded up;
    None when there is no quota. The tightest quota on the way from this process's cgroup to the root
    wins, as the kernel enforces every one of them."""
    v2 = [_v2_quota(directory / "cpu.max") for directory in _own_directories(root, "")]
    v1 = [
        _v1_quota(directory)
        for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu")
        for directory in _own_directories(root / mount, "cpu")
    ]
    quotas = [quota for quota in v2 + v1 if quota is not None]
    return min(quotas) if quotas else None


def _own_directories(mount: Path, controller: str) -> list[Path]:
    """`mount` joined with this process's cgroup path for `controller` ("" for v2), and each parent up
    to `mount`. In a container with its own cgroup namespace the path is "/" and this is just `mount`."""
    relative = "/"
    try:
        lines = _OWN_CGROUPS.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if (controller == "" and controllers == "") or (controller and controller in controllers.split(",")):
            relative = path
            break
    directory = mount / relative.lstrip("/")
    directories = [directory]
    while directory != mount and mount in directory.parents:
        directory = directory.parent
        directories.append(directory)
    return directories


def _v2_quota(cpu_max: Path) -> int | None:
    # "max 100000" (no quota) or "200000 100000" (2 CPUs' worth of every 100 ms).
    try:
        fields = cpu_max.read_text().split()
        if not fields or fields[0] == "max":
            return None
        period = int(fields[1]) if len(fields) > 1 else 100_000
        return _cpus(int(fields[0]), period)
    except (OSError, ValueError):
        return None


def _v1_quota(directory: Path) -> int | None:
    # cpu.cfs_quota_us is -1 when there is no quota.
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _cpus(quota, period)


def _cpus(quota: int, period: int) -> int | None:
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


# Compute threads (decode, forward, the runtime's own pool) run at this nice value, the event loop
# at the process's own: when the cores are saturated, the loop still gets them first, so that
# refusals (429, 503) and health checks stay fast. CFS gives a nice-5 thread about a third of the
# share of a nice-0 one; the compute threads' shares among themselves are unchanged.
COMPUTE_NICENESS = 5


def lower_thread_priority() -> None:
    """Give the calling thread (and the threads it starts later) the compute threads' priority.
    Linux sets priority per thread; elsewhere, or where it is not allowed, nothing changes."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, max(os.getpriority(os.PRIO_PROCESS, thread), COMPUTE_NICENESS))
    except (AttributeError, OSError):
        pass
