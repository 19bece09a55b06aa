"""HTTP load generator for image-classification servers (resnet-serve, TorchServe, LitServe, ...).

Closed loop: N clients, each sends its next request as soon as its previous answer arrived.
Open loop: requests arrive at a fixed rate (Poisson or uniform), whatever the server's pace; latency
counts from the scheduled arrival, so a slow server cannot hide its queue (no coordinated omission).

Every request uploads one photo of the mix (benchmarks/photos.py) as multipart/form-data. The
default client is a minimal HTTP/1.1 keep-alive client on raw asyncio streams: each request body is
built once, so the generator spends a few tens of microseconds of CPU a request (`--client httpx`
for comparison; the report prints the generator's CPU use so you can see it is not the bottleneck).

Examples:
  python -m benchmarks.loadgen --url http://127.0.0.1:8080 --concurrency 1,4,16 --duration 15
  python -m benchmarks.loadgen --url http://127.0.0.1:8080 --rate 20 --duration 15 --arrival poisson
  python -m benchmarks.loadgen --url http://127.0.0.1:8080 --route /resnet18v1/predict \\
      --compare http://127.0.0.1:8081 --compare-route /predictions/resnet18 --concurrency 1,16
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import random
import re
import sys
import time
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks.photos import Photo, load_photos

REQUEST_TIMEOUT_S = 60.0
PREFIX = "resnet_serve"

# -- targets and requests -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where to send the load: base URL, route and the multipart field name of the image."""

    url: str
    route: str = "/resnet18v1/predict"
    field: str = "data"
    metrics_path: str | None = "/metrics"
    name: str = ""

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def label(self) -> str:
        return self.name or f"{self.url}{self.route}"


def multipart_body(photo: Photo, field_name: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field_name}"; filename="{photo.name}.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    body = head + photo.data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def raw_request(target: Target, photo: Photo) -> bytes:
    """The whole HTTP/1.1 request (head and body) for one photo, built once and reused."""
    body, content_type = multipart_body(photo, target.field)
    head = (
        f"POST {target.route} HTTP/1.1\r\n"
        f"Host: {target.host}:{target.port}\r\n"
        "User-Agent: resnet-serve-loadgen\r\n"
        "Accept: application/json\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def one_shot(port: int, request: bytes, *, hang_up: bool = False, timeout_s: float = 120) -> str:
    """Send a whole `Connection: close` request on a fresh connection and return the status as text
    ('refused', 'error' for a reset or timeout, 'hung-up' when told to leave without reading)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return "refused"
    try:
        writer.write(request)
        await writer.drain()
        if hang_up:
            return "hung-up"
        response = await asyncio.wait_for(reader.read(), timeout=timeout_s)
        return response[9:12].decode() or "empty"
    except (OSError, TimeoutError):
        return "error"
    finally:
        writer.close()


# -- a minimal keep-alive HTTP/1.1 client ---------------------------------------------------------


class ConnectionClosed(Exception):
    pass


class RawConnection:
    """One keep-alive connection; one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def request(self, payload: bytes) -> tuple[int, bytes]:
        """Send a prebuilt request; return (status, body). Retries once on a stale keep-alive socket."""
        for attempt in (0, 1):
            fresh = self._writer is None
            if fresh:
                await self._open()
            try:
                return await self._exchange(payload)
            except (ConnectionClosed, ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError):
                self.close()
                if fresh or attempt == 1:
                    raise
        raise AssertionError("unreachable")

    async def _exchange(self, payload: bytes) -> tuple[int, bytes]:
        assert self._reader is not None
        assert self._writer is not None
        self._writer.write(payload)
        await self._writer.drain()
        try:
            head = await self._reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise ConnectionClosed() from None
            raise
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self._reader.readexactly(int(headers["content-length"]))
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked()
        else:  # body runs to the end of the connection
            body = await self._reader.read()
            self.close()
            return status, body
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, body

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        chunks: list[bytes] = []
        while True:
            size_line = await self._reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")  # trailers are not expected; eat the final CRLF
                return b"".join(chunks)
            chunks.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)


class Sender:
    """Sends prebuilt requests over keep-alive connections, raw asyncio streams or httpx."""

    def __init__(self, target: Target, photos: Sequence[Photo], client: str = "raw") -> None:
        self.target = target
        self.client = client
        self.payloads = [raw_request(target, p) for p in photos]
        self.bodies = [multipart_body(p, target.field) for p in photos]
        self._idle: deque[RawConnection] = deque()
        self._httpx: Any = None
        self.sample: Any = None

    async def __aenter__(self) -> Sender:
        if self.client == "httpx":
            import httpx

            self._httpx = httpx.AsyncClient(
                base_url=self.target.url,
                timeout=REQUEST_TIMEOUT_S,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=1024),
            )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        while self._idle:
            self._idle.pop().close()
        if self._httpx is not None:
            await self._httpx.aclose()

    async def send(self, index: int) -> tuple[int, bytes]:
        if self._httpx is not None:
            body, content_type = self.bodies[index]
            response = await self._httpx.post(self.target.route, content=body, headers={"content-type": content_type})
            return response.status_code, response.content
        connection = self._idle.pop() if self._idle else RawConnection(self.target.host, self.target.port)
        try:
            result = await connection.request(self.payloads[index])
        except BaseException:
            connection.close()
            raise
        self._idle.append(connection)
        return result

    def keep_sample(self, status: int, body: bytes) -> None:
        if self.sample is None and status == 200:
            try:
                self.sample = json.loads(body)
            except ValueError:
                self.sample = body[:200].decode("latin-1")


# -- server metrics -------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(target: Target, timeout_s: float = 10.0) -> dict[str, float] | None:
    """The Prometheus text of the target as {'name{labels}': value}, or None if it has none."""
    if not target.metrics_path:
        return None
    try:
        with urllib.request.urlopen(target.url + target.metrics_path, timeout=timeout_s) as response:
            text = response.read().decode()
    except OSError:
        return None
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match:
            with contextlib.suppress(ValueError):
                samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def _sum_matching(samples: dict[str, float], name: str, model: str | None) -> float:
    total = 0.0
    for key, value in samples.items():
        base, _, labels = key.partition("{")
        if base == name and (model is None or f'model="{model}"' in labels):
            total += value
    return total


@dataclass
class ServerStats:
    """Deltas of the server's own metrics over one load run (resnet-serve names)."""

    batches: float = 0.0
    images: float = 0.0
    mean_batch: float = 0.0
    requests: float = 0.0
    mean_request_s: float = 0.0
    mean_preprocess_s: float = 0.0
    mean_queue_wait_s: float = 0.0
    mean_inference_per_batch_s: float = 0.0
    inference_busy_s: float = 0.0
    preprocess_busy_s: float = 0.0
    cpu_s: float = 0.0

    @classmethod
    def from_delta(cls, before: dict[str, float], after: dict[str, float], model: str | None) -> ServerStats:
        def delta(name: str) -> float:
            return _sum_matching(after, name, model) - _sum_matching(before, name, model)

        def mean(name: str) -> tuple[float, float]:
            count = delta(f"{PREFIX}_{name}_count")
            total = delta(f"{PREFIX}_{name}_sum")
            return (total / count if count else 0.0), total

        batches = delta(f"{PREFIX}_batch_size_count")
        images = delta(f"{PREFIX}_batch_size_sum")
        mean_request, _ = mean("request_duration_seconds")
        mean_preprocess, preprocess_busy = mean("preprocess_duration_seconds")
        mean_wait, _ = mean("queue_wait_seconds")
        mean_inference, inference_busy = mean("inference_duration_seconds")
        return cls(
            batches=batches,
            images=images,
            mean_batch=images / batches if batches else 0.0,
            requests=delta(f"{PREFIX}_request_duration_seconds_count"),
            mean_request_s=mean_request,
            mean_preprocess_s=mean_preprocess,
            mean_queue_wait_s=mean_wait,
            mean_inference_per_batch_s=mean_inference,
            inference_busy_s=inference_busy,
            preprocess_busy_s=preprocess_busy,
            cpu_s=_sum_matching(after, "process_cpu_seconds_total", None)
            - _sum_matching(before, "process_cpu_seconds_total", None),
        )


# -- results --------------------------------------------------------------------------------------


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


class _Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()

    def record(self, outcome: str | int, latency: float) -> None:
        if outcome == 200:
            self.latencies.append(latency)
        else:
            self.errors[str(outcome)] += 1


async def _timed_send(sender: Sender, index: int, tally: _Tally, started: float) -> None:
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
) -> tuple[_Tally, float]:
    """`concurrency` clients back to back until `duration_s` passed or `max_requests` were sent."""
    tally = _Tally()
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
) -> tuple[_Tally, float]:
    """Requests arrive at `rate` a second for `duration_s`; more than `max_inflight` outstanding are
    counted as `dropped` (the generator refuses to grow without bound)."""
    tally = _Tally()
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
    before = await asyncio.to_thread(scrape, target)
    mode, level = ("open", rate) if rate is not None else ("closed", float(concurrency or 0))
    if processes > 1:
        tally, elapsed, cpu, sample = await _run_sharded(
            target, photos, processes, concurrency=concurrency, rate=rate, duration_s=duration_s,
            max_requests=max_requests, arrival=arrival, client=client, seed=seed,
        )  # fmt: skip
    else:
        tally, elapsed, cpu, sample = await _run_shard(
            target, photos, concurrency=concurrency, rate=rate, duration_s=duration_s,
            max_requests=max_requests, arrival=arrival, client=client, seed=seed,
        )  # fmt: skip
    after = await asyncio.to_thread(scrape, target)
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
) -> tuple[_Tally, float, float, Any]:
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
) -> tuple[_Tally, float, float, Any]:
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
    tally = _Tally()
    for latencies, errors, _, _ in parts:
        tally.latencies.extend(latencies)
        tally.errors.update(errors)
    return tally, max(part[2] for part in parts), sum(part[3] for part in parts), None


# -- reporting ------------------------------------------------------------------------------------


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


def parse_levels(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def wait_ready(url: str, path: str = "/ping", timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url + path, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.25)
    raise TimeoutError(f"{url}{path} did not answer 200 within {timeout_s:.0f} s")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="base URL of the server (A)")
    parser.add_argument("--route", default="/resnet18v1/predict", help="prediction route of A")
    parser.add_argument("--field", default="data", help="multipart field of the image for A")
    parser.add_argument("--metrics-path", default="/metrics", help="Prometheus route of A ('' for none)")
    parser.add_argument("--model", default=None, help="model label to read from /metrics (default: all)")
    parser.add_argument("--compare", default=None, help="base URL of a second server (B) given the same load")
    parser.add_argument("--compare-route", default=None, help="prediction route of B (default: A's)")
    parser.add_argument("--compare-field", default=None, help="multipart field of B (default: A's)")
    parser.add_argument("--compare-metrics-path", default="", help="Prometheus route of B (default: none)")
    parser.add_argument("--ready-path", default="/ping", help="readiness route of A, waited on first")
    parser.add_argument("--compare-ready-path", default="/ping", help="readiness route of B (LitServe: /health)")
    parser.add_argument("--concurrency", default="1,4,16", help="closed loop: comma-separated client counts")
    parser.add_argument("--rate", type=float, default=None, help="open loop instead: arrivals a second")
    parser.add_argument("--arrival", choices=("poisson", "uniform"), default="poisson")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per level (default 15)")
    parser.add_argument("--requests", type=int, default=None, help="stop a level after this many requests")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first (default 3)")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--processes", type=int, default=1, help="generator processes sharing the clients or the rate (default 1)"
    )
    return parser


async def _main_async(args: argparse.Namespace) -> int:
    photos = load_photos()
    a = Target(args.url, args.route, args.field, args.metrics_path or None, name="A " + args.url + args.route)
    targets = [a]
    if args.compare:
        route = args.compare_route or args.route
        b = Target(
            args.compare, route, args.compare_field or args.field, args.compare_metrics_path or None,
            name="B " + args.compare + route,
        )  # fmt: skip
        targets.append(b)
    for target, ready_path in zip(targets, (args.ready_path, args.compare_ready_path), strict=False):
        wait_ready(target.url, ready_path, timeout_s=30)
        if args.warmup > 0:
            await run_level(target, photos, concurrency=4, duration_s=args.warmup, client=args.client)
    levels: list[tuple[int | None, float | None]] = (
        [(None, args.rate)] if args.rate is not None else [(c, None) for c in parse_levels(args.concurrency)]
    )
    results: list[LoadResult] = []
    pairs: list[tuple[LoadResult, LoadResult]] = []
    for concurrency, rate in levels:
        row = []
        for target in targets:
            result = await run_level(
                target, photos, concurrency=concurrency, rate=rate, duration_s=args.duration,
                max_requests=args.requests, arrival=args.arrival, client=args.client, model=args.model,
                seed=args.seed, processes=args.processes,
            )  # fmt: skip
            row.append(result)
            results.append(result)
            print(format_results([result]).splitlines()[2], flush=True)
        if len(row) == 2:
            pairs.append((row[0], row[1]))
    print()
    print(format_results(results))
    if pairs:
        print()
        print(format_side_by_side(pairs))
    if args.json:
        Path(args.json).write_text(json.dumps([r.summary() for r in results], indent=2, default=str))  # noqa: ASYNC240
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if os.environ.get("PYTHONASYNCIODEBUG"):
        print("warning: asyncio debug mode slows the generator down", file=sys.stderr)
    return asyncio.run(_main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
