"""The load itself. Closed loop: N clients, each sends its next request as soon as its previous
answer arrived. Open loop: requests arrive at a fixed rate (Poisson or uniform) whatever the
server's pace, latency counted from the scheduled arrival (no coordinated omission). A burst: a
fixed rate of one-shot connections, the way a crowd arrives. A level can be split over processes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import multiprocessing
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.harness.http import REQUEST_TIMEOUT_S, ConnectionClosed, Sender, Target, one_shot
from benchmarks.harness.metrics import Metrics, ServerStats, scrape
from benchmarks.photos import Photo


def parse_levels(text: str) -> list[int]:
    """`1,4,16` -> [1, 4, 16]: the levels of a sweep as a command line gives them."""
    return [int(part) for part in text.split(",") if part.strip()]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class LoadResult:
    target: str
    mode: str  # "closed" or "open"
    level: float  # concurrency (closed) or offered requests/s (open)
    elapsed_s: float
    ok: int
    errors: dict[str, int]
    latencies_s: list[float] = field(repr=False)
    generator_cpu_s: float
    client: str
    server: ServerStats | None = None
    sample: Any = None

    @property
    def throughput(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def pct(self, q: float) -> float:
        return percentile(self.latencies_s, q)

    @property
    def mean_latency_s(self) -> float:
        return sum(self.latencies_s) / len(self.latencies_s) if self.latencies_s else math.nan

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("latencies_s")
        data.pop("sample")
        data.update(
            throughput_img_s=self.throughput,
            p50_s=self.pct(50),
            p90_s=self.pct(90),
            p99_s=self.pct(99),
            max_s=self.latencies_s[-1] if self.latencies_s else math.nan,
            mean_s=self.mean_latency_s,
            generator_cpu_pct=100 * self.generator_cpu_s / self.elapsed_s if self.elapsed_s else 0.0,
            generator_cpu_us_per_request=1e6 * self.generator_cpu_s / max(1, self.ok + self.error_count),
        )
        return data


class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()

    def record(self, outcome: str | int, latency: float) -> None:
        if outcome == 200:
            self.latencies.append(latency)
        else:
            self.errors[str(outcome)] += 1


async def _timed_send(sender: Sender, index: int, tally: Tally, started: float) -> None:
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            status, body = await sender.send(index)
    except TimeoutError:
        tally.record("timeout", 0.0)
        return
    except (OSError, ConnectionClosed, asyncio.IncompleteReadError, ValueError) as exc:
        tally.record(type(exc).__name__, 0.0)
        return
    except Exception as exc:  # httpx errors and the like: count them, never stop the run
        tally.record(type(exc).__name__, 0.0)
        return
    tally.record(status, time.perf_counter() - started)
    sender.keep_sample(status, body)


async def closed_loop(
    sender: Sender, concurrency: int, *, duration_s: float, max_requests: int | None = None, seed: int = 0
) -> tuple[Tally, float]:
    """`concurrency` clients back to back until `duration_s` passed or `max_requests` were sent."""
    tally = Tally()
    count = len(sender.payloads)
    budget = max_requests if max_requests is not None else 10_000_000
    sent = 0
    start = time.perf_counter()
    stop_at = start + duration_s

    async def client(worker: int) -> None:
        nonlocal sent
        rng = random.Random(seed * 1_000_003 + worker)
        index = worker % count
        while time.perf_counter() < stop_at and sent < budget:
            sent += 1
            await _timed_send(sender, index, tally, time.perf_counter())
            index = rng.randrange(count)

    await asyncio.gather(*(client(w) for w in range(concurrency)))
    return tally, time.perf_counter() - start


async def open_loop(
    sender: Sender,
    rate: float,
    *,
    duration_s: float,
    arrival: str = "poisson",
    max_inflight: int = 512,
    seed: int = 0,
) -> tuple[Tally, float]:
    """Requests arrive at `rate` a second for `duration_s`; more than `max_inflight` outstanding are
    counted as `dropped` (the generator refuses to grow without bound)."""
    tally = Tally()
    rng = random.Random(seed)
    count = len(sender.payloads)
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    scheduled = start
    for _ in range(int(rate * duration_s * 3) + 10):  # bounded; the loop normally ends on time
        scheduled += rng.expovariate(rate) if arrival == "poisson" else 1.0 / rate
        if scheduled - start >= duration_s:
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_inflight:
            tally.record("dropped", 0.0)
            continue
        task = asyncio.create_task(_timed_send(sender, rng.randrange(count), tally, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return tally, time.perf_counter() - start


async def _timed_one_shot(port: int, request: bytes) -> tuple[str, float]:
    started = time.perf_counter()
    status = await one_shot(port, request)
    return status, time.perf_counter() - started


async def burst(port: int, requests: Sequence[bytes], rate: float, duration_s: float) -> list[tuple[str, float]]:
    """Fire `Connection: close` requests (cycling through `requests`) at `rate` a second for
    `duration_s`, whatever the answers; (status as `one_shot` gives it, seconds) for each."""
    tasks: list[asyncio.Task[tuple[str, float]]] = []
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < duration_s:
        for _ in range(int(elapsed * rate) + 1 - len(tasks)):
            tasks.append(asyncio.create_task(_timed_one_shot(port, requests[len(tasks) % len(requests)])))
        await asyncio.sleep(0.002)
    return list(await asyncio.gather(*tasks))


def scrape_target(target: Target) -> Metrics | None:
    return scrape(target.url + target.metrics_path) if target.metrics_path else None


async def run_level(
    target: Target,
    photos: Sequence[Photo],
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    duration_s: float = 15.0,
    max_requests: int | None = None,
    arrival: str = "poisson",
    client: str = "raw",
    model: str | None = None,
    seed: int = 0,
    processes: int = 1,
) -> LoadResult:
    """One load run with the server's metrics scraped just before and just after it. With
    `processes` > 1 the clients (or the arrival rate) are split over that many generator processes,
    for servers that answer more requests a second than one Python process can send."""
    before = await asyncio.to_thread(scrape_target, target)
    mode, level = ("open", rate) if rate is not None else ("closed", float(concurrency or 0))
    shard: dict[str, Any] = {
        "concurrency": concurrency, "rate": rate, "duration_s": duration_s, "max_requests": max_requests,
        "arrival": arrival, "client": client, "seed": seed,
    }  # fmt: skip
    if processes > 1:
        tally, elapsed, cpu, sample = await _run_sharded(target, photos, processes, **shard)
    else:
        tally, elapsed, cpu, sample = await _run_shard(target, photos, **shard)
    after = await asyncio.to_thread(scrape_target, target)
    server = ServerStats.from_delta(before, after, model) if before is not None and after is not None else None
    return LoadResult(
        target=target.label,
        mode=mode,
        level=level,
        elapsed_s=elapsed,
        ok=len(tally.latencies),
        errors=dict(tally.errors),
        latencies_s=sorted(tally.latencies),
        generator_cpu_s=cpu,
        client=client,
        server=server,
        sample=sample,
    )


async def _run_shard(
    target: Target,
    photos: Sequence[Photo],
    *,
    concurrency: int | None,
    rate: float | None,
    duration_s: float,
    max_requests: int | None,
    arrival: str,
    client: str,
    seed: int,
) -> tuple[Tally, float, float, Any]:
    """One process's share of a level: (tally, elapsed s, generator CPU s, a sample answer)."""
    async with Sender(target, photos, client) as sender:
        cpu0 = time.process_time()
        if rate is not None:
            tally, elapsed = await open_loop(sender, rate, duration_s=duration_s, arrival=arrival, seed=seed)
        else:
            assert concurrency is not None
            tally, elapsed = await closed_loop(
                sender, concurrency, duration_s=duration_s, max_requests=max_requests, seed=seed
            )
        return tally, elapsed, time.process_time() - cpu0, sender.sample


def _shard_in_process(kwargs: dict[str, Any]) -> tuple[list[float], dict[str, int], float, float]:
    tally, elapsed, cpu, _ = asyncio.run(_run_shard(**kwargs))
    return tally.latencies, dict(tally.errors), elapsed, cpu


async def _run_sharded(
    target: Target,
    photos: Sequence[Photo],
    processes: int,
    *,
    concurrency: int | None,
    rate: float | None,
    max_requests: int | None,
    **common: Any,
) -> tuple[Tally, float, float, Any]:
    shards: list[dict[str, Any]] = []
    for index in range(processes):
        share: dict[str, Any] = {"concurrency": None, "rate": None, "max_requests": None}
        if rate is not None:
            share["rate"] = rate / processes
        else:
            assert concurrency is not None
            share["concurrency"] = concurrency // processes + (1 if index < concurrency % processes else 0)
            if share["concurrency"] == 0:
                continue
        if max_requests is not None:
            share["max_requests"] = max(1, max_requests // processes)
        shards.append({"target": target, "photos": list(photos), **common, **share, "seed": common["seed"] + index})
    loop = asyncio.get_running_loop()
    # Spawned, not forked: a fork of a process with a running event loop and threads is unsafe.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=len(shards), mp_context=context) as pool:
        parts = await asyncio.gather(*(loop.run_in_executor(pool, _shard_in_process, shard) for shard in shards))
    tally = Tally()
    for latencies, errors, _, _ in parts:
        tally.latencies.extend(latencies)
        tally.errors.update(errors)
    return tally, max(part[2] for part in parts), sum(part[3] for part in parts), None
