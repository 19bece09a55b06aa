"""Settings, the resolved ServerPlan, the README's settings table, and the usable-CPU count."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys

import pytest

from service import cores
from service.config import ServerPlan, Settings
from tests.conftest import REPO


def test_the_plan_has_the_settings_names_and_nothing_left_to_choose():
    names = [field.name for field in dataclasses.fields(ServerPlan)]
    assert sorted(names) == sorted(Settings.model_fields)
    # None there is no default left open: there are no calibration photos when nothing is quantised.
    not_applicable = {"calibration_images"}
    for field in dataclasses.fields(ServerPlan):
        assert "None" not in str(field.type) or field.name in not_applicable, field.name
    plan = Settings().resolve(on_gpu=False)
    assert all(getattr(plan, name) is not None for name in names if name not in not_applicable)
    assert plan.max_delay_s == plan.max_delay_ms / 1000
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.max_batch_size = 3  # type: ignore[misc]


def test_explicit_values_win_and_the_rest_follow_the_device():
    plan = Settings(max_batch_size=4, max_delay_ms=0, torch_threads=3, decode_workers=5).resolve(on_gpu=True)
    assert (plan.max_batch_size, plan.max_delay_ms, plan.torch_threads, plan.decode_workers) == (4, 0, 3, 5)
    assert (plan.batch_buckets, plan.cuda_graphs, plan.max_batches_in_flight) == ((1, 2, 4), True, 2)
    # The queue is 8 batches, and the default largest request shrinks to fit it.
    assert (plan.max_queue_size, plan.max_images_per_request) == (32, 32)


def test_a_request_larger_than_the_queue_is_refused_naming_both_settings():
    with pytest.raises(ValueError, match="could never be admitted") as refused:
        Settings(max_queue_size=8, max_images_per_request=64).resolve(on_gpu=False)
    message = str(refused.value)
    assert "--max-images-per-request (64) is larger than --max-queue-size (8)" in message
    assert "raise --max-queue-size or lower --max-images-per-request" in message
    assert "\n" not in message


def test_each_default_gives_way_to_the_other_explicit_value():
    small_queue = Settings(max_queue_size=16).resolve(on_gpu=False)
    assert (small_queue.max_queue_size, small_queue.max_images_per_request) == (16, 16)
    big_requests = Settings(max_images_per_request=200).resolve(on_gpu=False)
    assert (big_requests.max_queue_size, big_requests.max_images_per_request) == (200, 200)
    defaults = Settings().resolve(on_gpu=False)
    assert (defaults.max_queue_size, defaults.max_images_per_request) == (64, 64)
    gpu = Settings().resolve(on_gpu=True)
    assert (gpu.max_queue_size, gpu.max_images_per_request) == (512, 64)


def _readme_settings_table() -> dict[str, str]:
    """flag -> default cell of the README's Configuration table."""
    section = (REPO / "README.md").read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("| `--"):
            continue
        flag_cell, default_cell = (cell.strip() for cell in line.strip("|").split("|")[:2])
        for flag in re.findall(r"`(--[a-z0-9-]+)`", flag_cell):
            if not flag.startswith("--no-"):
                rows[flag] = default_cell
    return rows


def _as_written(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(str(part) for part in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_the_readme_lists_every_setting_with_its_default():
    table = _readme_settings_table()
    assert sorted(table) == sorted("--" + name.replace("_", "-") for name in Settings.model_fields)
    checked = 0
    for name, field in Settings.model_fields.items():
        cell = table["--" + name.replace("_", "-")]
        literal = re.fullmatch(r"`([^`]*)`", cell)
        if literal:
            assert literal.group(1) == _as_written(field.default), name
            checked += 1
        elif cell in ("on", "off"):
            assert field.default is (cell == "on"), name
            checked += 1
    assert checked >= 20  # the table states most defaults literally


def _cgroup_v2(root, cpu_max: str):
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def test_a_cgroup_v2_quota_is_rounded_up(tmp_path):
    assert cores.cgroup_cpu_quota(_cgroup_v2(tmp_path / "a", "200000 100000")) == 2
    assert cores.cgroup_cpu_quota(_cgroup_v2(tmp_path / "b", "150000 100000")) == 2
    assert cores.cgroup_cpu_quota(_cgroup_v2(tmp_path / "c", "10000 100000")) == 1
    assert cores.cgroup_cpu_quota(_cgroup_v2(tmp_path / "d", "max 100000")) is None
    assert cores.cgroup_cpu_quota(tmp_path / "none") is None


def test_a_cgroup_v1_quota_counts_and_minus_one_is_no_quota(tmp_path):
    limited = tmp_path / "limited" / "cpu,cpuacct"
    limited.mkdir(parents=True)
    (limited / "cpu.cfs_quota_us").write_text("250000\n")
    (limited / "cpu.cfs_period_us").write_text("100000\n")
    assert cores.cgroup_cpu_quota(tmp_path / "limited") == 3
    (limited / "cpu.cfs_quota_us").write_text("-1\n")
    assert cores.cgroup_cpu_quota(tmp_path / "limited") is None


def test_the_thread_defaults_follow_the_cgroup_quota(tmp_path, monkeypatch):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two usable CPUs to see a quota of one")
    monkeypatch.setattr(cores, "CGROUP_ROOT", _cgroup_v2(tmp_path, "100000 100000"))
    plan = Settings().resolve(on_gpu=False)
    assert (plan.torch_threads, plan.decode_workers) == (1, 1)


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_the_thread_defaults_follow_the_affinity_mask():
    """Pinned to one CPU by `taskset`, a process counts one CPU, not the host's."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two usable CPUs to tell them apart")
    code = (
        "from service.config import Settings; plan = Settings().resolve(on_gpu=False); "
        "print(plan.torch_threads, plan.decode_workers)"
    )
    result = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", code],
        capture_output=True, text=True, check=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert result.stdout.split() == ["1", "1"]


@pytest.mark.parametrize(("grace", "connections", "limit"), [(0.5, 2048, 2048), (0.0, 0, None)])
def test_uvicorn_keeps_the_grace_fraction_and_gets_the_connection_cap(grace, connections, limit):
    from service.server import uvicorn_config

    plan = Settings(shutdown_grace_s=grace, max_connections=connections).resolve(on_gpu=False)
    config = uvicorn_config(object(), plan)  # type: ignore[arg-type]
    # 0 must reach asyncio.wait_for as 0 (cancel at once); None would wait for ever.
    assert config.timeout_graceful_shutdown == grace and config.timeout_graceful_shutdown is not None
    assert config.limit_concurrency == limit
