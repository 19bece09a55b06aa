"""Overload: about 10x the measured capacity for 60 s, as issue 5 asks; the CI test runs 8 s of it.

    python -m benchmarks.overload                       # capacity at 16 clients, then 10x for 60 s
    python -m benchmarks.overload --factor 10 --duration 60 --queue 16

Reports how fast refusals come (429 p50/p99), how accepted requests fare, any 5xx, the server's RSS
before and after, readiness right after the burst, and images computed against images answered.
Each request opens its own connection (`Connection: close`), the way a crowd of clients arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from collections import Counter
from pathlib import Path

from benchmarks.harness.http import Target, raw_request
from benchmarks.harness.load import burst, percentile, run_level, scrape_target
from benchmarks.harness.metrics import Metrics
from benchmarks.harness.server import serving, write_weights
from benchmarks.photos import load_photos

MODEL = {"model": "resnet18v1"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factor", type=float, default=10.0, help="offered load as a multiple of capacity")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--queue", type=int, default=16, help="--max-queue-size of the server")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    weights = Path(tempfile.mkdtemp(prefix="overload-weights-"))
    write_weights("resnet18v1", weights)
    flags = ("--max-queue-size", str(args.queue), "--request-timeout-s", "10")
    photos = load_photos()
    log = weights / "server.log"
    with serving(weights, log, *flags, ready_timeout_s=180, stop_timeout_s=40) as server:
        port = server.port
        target = Target(server.url)
        requests = [raw_request(target, photo).replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1)
                    for photo in photos]  # fmt: skip
        capacity = asyncio.run(run_level(target, photos, concurrency=16, duration_s=10, model="resnet18v1"))
        rate = args.factor * capacity.throughput
        # A short burst first, so the RSS baseline already holds the allocator's pools.
        asyncio.run(burst(port, requests, rate, 3))
        rss_before = server.rss_bytes() / 2**20
        metrics_before = scrape_target(target) or Metrics(())
        results = asyncio.run(burst(port, requests, rate, args.duration))
        ready = scrape_target(target)
        ping_after = ready.value("resnet_serve_ready", default=float("nan")) if ready else float("nan")
        metrics_after = ready or Metrics(())
        rss_after = server.rss_bytes() / 2**20

    by_status: dict[str, list[float]] = {}
    for status, seconds in results:
        by_status.setdefault(status, []).append(seconds)
    for values in by_status.values():
        values.sort()

    def delta(name: str, **labels: str) -> float:
        return metrics_after.total(name, labels) - metrics_before.total(name, labels)

    computed = delta("resnet_serve_images_total", **MODEL)
    expired = delta("resnet_serve_rejected_total", **MODEL, reason="deadline")
    report = {
        "capacity_img_s": round(capacity.throughput, 1),
        "offered_req_s": round(rate, 1),
        "duration_s": args.duration,
        "counts": dict(Counter(status for status, _ in results)),
        "latency_ms": {
            status: {
                "p50": round(1000 * percentile(v, 50), 1),
                "p99": round(1000 * percentile(v, 99), 1),
                "max": round(1000 * v[-1], 1),
            }
            for status, v in by_status.items()
        },
        "server_errors_5xx": sum(len(v) for s, v in by_status.items() if s.startswith("5")),
        "rss_mib_before": round(rss_before, 1),
        "rss_mib_after": round(rss_after, 1),
        "rss_change": round(rss_after / rss_before - 1, 4),
        "ready_right_after": ping_after,
        "images_computed": computed,
        "answered_200": len(by_status.get("200", [])),
        "expired_in_queue": expired,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
