"""The autoscaling signal, live: nginx (Debian's) in front of two real servers, a real Prometheus
scraping each of them as Prometheus Operator's PodMonitor would, and the exact query of the KEDA
ScaledObject that `kubectl kustomize deploy/k8s/examples/cpu-keda` renders.

Under N closed-loop clients the query must return the in-flight count the load implies (about N in
all, N/2 for each of 2 pods, the value KEDA compares with T); with one server killed mid-load, nginx's
retry (`proxy_next_upstream`) must hide the loss from every client, and the query must see one pod.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.harness import nginx
from tests.conftest import KITTEN, REPO
from tests.integration.live import LiveServer, free_port, spawn
from tests.integration.test_k8s_manifests import render
from tests.integration.test_prometheus import Prometheus, running_prometheus, wait_until

pytestmark = pytest.mark.integration

CLIENTS = 8
# What Prometheus Operator adds to every series it scrapes from a pod of the cpu-keda example: the
# pod's namespace and name, and the pod labels the PodMonitor lists in podTargetLabels
# (deploy/k8s/base/podmonitor.yaml), dots turned into underscores. Filled in from the rendered
# Deployment below; nothing else of the query is changed.
INSTANCE_LABEL = "app.kubernetes.io/instance"
NAME_LABEL = "app.kubernetes.io/name"


@dataclass(frozen=True)
class KedaTrigger:
    query: str
    namespace: str
    pod_labels: dict[str, str]

    @property
    def selector(self) -> str:
        """The query's series selector, `metric{...}`, without the aggregation around it."""
        match = re.fullmatch(r"sum\((\w+\{[^}]*\})\)", self.query)
        assert match, f"the KEDA query is no longer sum(metric{{...}}): {self.query}"
        return match.group(1)


@pytest.fixture(scope="module")
def keda() -> KedaTrigger:
    objects = render("examples/cpu-keda")
    (scaled,) = [o for o in objects if o["kind"] == "ScaledObject"]
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return KedaTrigger(
        query=trigger["metadata"]["query"],
        namespace=deployment["metadata"]["namespace"],
        pod_labels={key: labels[key] for key in (NAME_LABEL, INSTANCE_LABEL)},
    )


def require_nginx() -> str:
    path = nginx.find_nginx()
    if path is None:
        message = f"nginx is not installed; {nginx.INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def servers(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LiveServer]]:
    directory = tmp_path_factory.mktemp("signal-servers")
    # One forward and one decode thread each: two servers share this machine's two cores.
    flags = ("--torch-threads", "1", "--decode-workers", "1")
    started = [spawn(weights, directory / f"server-{i}.log", *flags) for i in range(2)]
    try:
        for server in started:
            server.wait_ready(120)
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def proxy(servers: list[LiveServer], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """nginx round robin over both servers, retrying a failed request on the other
    (`proxy_next_upstream ... non_idempotent`, benchmarks/harness/nginx.py)."""
    binary = require_nginx()
    directory = tmp_path_factory.mktemp("nginx")
    with nginx.running(binary, directory, {free_port(): [s.port for s in servers]}) as (url,):
        yield url


@pytest.fixture(scope="module")
def prometheus(
    servers: list[LiveServer], keda: KedaTrigger, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    directory = tmp_path_factory.mktemp("signal-prometheus")
    pod_labels = {key.replace(".", "_").replace("/", "_"): value for key, value in keda.pod_labels.items()}
    targets = [
        {
            "targets": [f"127.0.0.1:{server.port}"],
            "labels": {"namespace": keda.namespace, "pod": f"resnet-serve-{i}", **pod_labels},
        }
        for i, server in enumerate(servers)
    ]
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "resnet-serve", "scrape_interval": "1s", "scrape_timeout": "1s", "static_configs": targets}
        ],
    }
    with running_prometheus(directory, config) as instance:
        wait_until(lambda: instance.value('count(up{job="resnet-serve"} == 1)') == 2, 30, "both servers scraped")
        yield instance


@dataclass
class Load:
    statuses: list[int]
    latencies_s: list[float]


async def closed_loop(url: str, image: bytes, clients: int, stop: asyncio.Event, load: Load) -> None:
    async def client(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                response = await http.post(
                    f"{url}/resnet18v1/predict", files={"data": ("kitten.jpg", image, "image/jpeg")}
                )
                load.statuses.append(response.status_code)
            except httpx.HTTPError:
                load.statuses.append(0)
            load.latencies_s.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))


def server_seconds(servers: list[LiveServer]) -> tuple[float, float]:
    """(sum, count) of every server's request-duration histogram of the predict route."""
    total = count = 0.0
    labels = {"model": "resnet18v1", "route": "predict"}
    for server in servers:
        metrics = server.metrics()
        total += metrics.value("resnet_serve_request_duration_seconds_sum", labels)
        count += metrics.value("resnet_serve_request_duration_seconds_count", labels)
    return total, count


def query_over(prometheus: Prometheus, query: str, start: float, end: float) -> list[float]:
    """The query evaluated at every second of [start, end] (unix seconds), as KEDA would at any of them."""
    data = prometheus.get("/api/v1/query_range", query=query, start=start, end=end, step="1s")
    assert len(data["result"]) == 1, data
    return [float(value) for _, value in data["result"][0]["values"]]


def test_the_keda_query_follows_the_load_and_a_lost_pod(servers, proxy, prometheus, keda):
    image = KITTEN.read_bytes()
    load = Load([], [])

    async def scenario() -> dict[str, float]:
        stop = asyncio.Event()
        clients = asyncio.create_task(closed_loop(proxy, image, CLIENTS, stop, load))
        marks: dict[str, float] = {}
        await asyncio.sleep(3)  # past the first batches: every client is in its loop
        # Wall-clock marks are for Prometheus's timestamps; the rate's duration is monotonic.
        marks["steady_from"] = time.time()
        seconds_before = await asyncio.to_thread(server_seconds, servers)
        answered_before, started = len(load.statuses), time.monotonic()
        await asyncio.sleep(10)
        marks["steady_to"] = time.time()
        seconds_after = await asyncio.to_thread(server_seconds, servers)
        marks["throughput"] = (len(load.statuses) - answered_before) / (time.monotonic() - started)
        marks["server_mean_s"] = (seconds_after[0] - seconds_before[0]) / (seconds_after[1] - seconds_before[1])
        marks["client_mean_s"] = statistics.fmean(load.latencies_s[answered_before:])
        # One pod dies without a goodbye, with requests in flight on it.
        servers[1].process.kill()
        marks["killed"] = time.time()
        await asyncio.sleep(8)
        marks["after_to"] = time.time()
        stop.set()
        await clients
        return marks

    marks = asyncio.run(scenario())

    # No client saw the lost pod: nginx resent its requests (and every later one) to the other.
    assert len(load.statuses) > 0 and set(load.statuses) == {200}, sorted(set(load.statuses))

    # Little's law at the servers: the in-flight count the load implies is the rate of answers times
    # the time each spends in a server (its own histogram); the rest of a client's cycle is nginx and
    # the client. Compare it with the exact query at each second of the steady load, within 3
    # standard errors of those samples plus half a request (the gauge counts whole requests).
    implied = marks["throughput"] * marks["server_mean_s"]
    samples = query_over(prometheus, keda.query, marks["steady_from"] + 1, marks["steady_to"])
    mean = statistics.fmean(samples)
    tolerance = 3 * statistics.stdev(samples) / len(samples) ** 0.5 + 0.5
    assert abs(mean - implied) <= tolerance, (mean, implied, tolerance, samples)
    # The closed loop holds N requests; all but the share of each cycle spent outside the servers
    # are in a server, and KEDA divides the sum by the 2 replicas: about N/2 each.
    outside = 1 - marks["server_mean_s"] / marks["client_mean_s"]
    assert abs(mean - CLIENTS) <= CLIENTS * outside + tolerance, (mean, outside, tolerance)
    # Both pods carried the load (round robin), so the average KEDA aims at T is a real average.
    per_pod = prometheus.results(f"avg_over_time({keda.selector}[8s] @ {marks['steady_to']})")
    assert len(per_pod) == 2 and all(float(p["value"][1]) > 0 for p in per_pod), per_pod

    # After the kill Prometheus marks the dead pod's series stale: the query's selector finds one
    # pod, and the query's sum is that pod's share, now the whole load.
    def one_pod() -> bool:
        return len(prometheus.results(keda.selector)) == 1

    wait_until(one_pod, 10, "the killed pod's series going stale")
    (alive,) = prometheus.results(keda.selector)
    assert alive["metric"]["pod"] == "resnet-serve-0"
    after = query_over(prometheus, keda.query, marks["killed"] + 3, marks["after_to"])
    assert abs(statistics.fmean(after) - CLIENTS) <= CLIENTS * outside + tolerance + 1, after


def test_install_nginx_script_is_valid_and_idempotent():
    script = REPO / "scripts" / "install-nginx.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    require_nginx()
    # Installed already: the script must change nothing and say so (no apt-get run).
    done = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "already installed" in done.stdout
