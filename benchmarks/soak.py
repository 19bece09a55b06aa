"""Soak: many mixed requests (good, bad, oversized, disconnecting) against a live server, with the
server's RSS, open fds and thread count sampled every N requests.

    python -m benchmarks.soak --requests 20000 --every 1000       # starts its own server
    python -m benchmarks.soak --url-port 8080 --pid 1234           # or drives a running one

Growth after warm-up (the first sample) should stay under 5 %.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.harness.http import multipart_request, one_shot
from benchmarks.harness.server import ServerProcess, process_stats, spawn, wait_ready, write_weights
from benchmarks.photos import SHARED_IMAGES


@dataclass
class Sample:
    requests: int
    rss_mib: float
    open_fds: int
    threads: int
    statuses: dict[str, int]


def _multipart(image: bytes, declared: int | None = None) -> bytes:
    return multipart_request(image, filename="x.jpg", boundary="soakb0undary", part_type=None, declared=declared)


def request_mix(max_upload_bytes: int) -> list[tuple[str, bytes, bool]]:
    """(kind, bytes to send, hang up before the end) in the proportions the soak cycles through."""
    kitten = (SHARED_IMAGES / "kitten.jpg").read_bytes()
    small = (SHARED_IMAGES / "kitten_small.jpg").read_bytes()
    oversized = _multipart(b"", declared=max_upload_bytes + 1)
    return [
        ("good", _multipart(small), False),
        ("good", _multipart(kitten), False),
        ("bad", _multipart(b"definitely not an image"), False),
        ("truncated", _multipart(kitten[: len(kitten) // 3]), False),
        ("oversized", oversized, False),
        ("disconnecting", _multipart(kitten)[: len(kitten) // 2], True),
    ]


async def soak(
    port: int, pid: int, *, total: int, every: int, concurrency: int, max_upload_bytes: int, settle_s: float = 2.5
) -> list[Sample]:
    mix = itertools.cycle(request_mix(max_upload_bytes))
    samples: list[Sample] = []
    statuses: Counter[str] = Counter()
    done = 0

    async def worker(until: int) -> None:
        nonlocal done
        while done < until:
            done += 1
            _, data, hang_up = next(mix)
            statuses[await one_shot(port, data, hang_up=hang_up, timeout_s=60)] += 1

    while done < total:
        target = min(total, done + every)
        await asyncio.gather(*(worker(target) for _ in range(min(concurrency, target - done))))
        # At rest: the server trims its heap a second after the last forward, so the sample is what
        # it keeps, not the free pages of the burst just ended.
        await asyncio.sleep(settle_s)
        stats = process_stats(pid)
        samples.append(Sample(done, round(stats.rss_bytes / 2**20, 1), stats.open_fds, stats.threads, dict(statuses)))
    return samples


def growth(samples: list[Sample]) -> dict[str, float]:
    """Relative growth from the first sample (after warm-up) to the last."""
    first, last = samples[0], samples[-1]
    return {
        "rss": last.rss_mib / first.rss_mib - 1,
        "open_fds": last.open_fds / first.open_fds - 1,
        "threads": last.threads / first.threads - 1,
    }


def _start_server(weights_dir: Path, port: int, max_upload_bytes: int) -> ServerProcess:
    write_weights("resnet18v1", weights_dir)
    return spawn(weights_dir, None, "--max-upload-bytes", str(max_upload_bytes), "--log-level", "warning", port=port)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--port", type=int, default=8097, help="port of the server (started here unless --pid)")
    parser.add_argument("--pid", type=int, default=None, help="pid of an already running server to drive")
    parser.add_argument("--max-upload-bytes", type=int, default=2_000_000)
    parser.add_argument("--json", type=Path, default=None, help="write the samples here too")
    args = parser.parse_args()

    server = None
    pid = args.pid
    if pid is None:
        server = _start_server(Path(tempfile.mkdtemp(prefix="soak-weights-")), args.port, args.max_upload_bytes)
        pid = server.pid
    try:
        wait_ready(f"http://127.0.0.1:{args.port}", timeout_s=120, process=server.process if server else None)
        started = time.perf_counter()
        samples = asyncio.run(
            soak(args.port, pid, total=args.requests, every=args.every, concurrency=args.concurrency,
                 max_upload_bytes=args.max_upload_bytes)
        )  # fmt: skip
        elapsed = time.perf_counter() - started
    finally:
        if server is not None:
            server.stop(timeout_s=60)
    print(f"{'requests':>9} {'rss MiB':>8} {'fds':>5} {'threads':>8}  statuses")
    for s in samples:
        print(f"{s.requests:>9} {s.rss_mib:>8} {s.open_fds:>5} {s.threads:>8}  {s.statuses}")
    change = growth(samples)
    print(f"{args.requests} requests in {elapsed:.0f} s; growth after warm-up: "
          + ", ".join(f"{k} {v:+.1%}" for k, v in change.items()))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"samples": [asdict(s) for s in samples], "growth": change}, indent=2))
    return 0 if all(v < 0.05 for v in change.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
