"""The Ray Serve adapter on a real multi-node Ray cluster (ray.cluster_utils.Cluster, three nodes on
loopback): correct answers through Ray's proxy, scale up under load and back down, a lost node."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import REPO
from tests.http.test_correctness import assert_matches, reference_probabilities
from tests.integration.live import free_port
from tests.integration.test_prometheus import Prometheus, running_prometheus, wait_until

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from service import ray_serve  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.integration]

APP = "resnet-serve"
# Each worker node has room for one replica, so two replicas sit on two nodes.
REPLICA_CPUS = 1
# Scaling at 2 ongoing requests a replica, reported every half second: the load below asks for 3
# replicas (capped at 2) within a few seconds, and its end for 1.
TARGET = 2
CLIENTS = 6


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # The workers Ray starts import the service from this checkout.
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), previous) if p)
    # The head runs Ray's controller and proxy, no replicas (as in deploy/k8s/ray/rayservice.yaml).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=REPLICA_CPUS)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
    try:
        yield cluster
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous


@pytest.fixture(scope="module")
def targets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where each replica keeps its Prometheus file_sd target while it runs."""
    return tmp_path_factory.mktemp("ray-metrics-targets")


@pytest.fixture(scope="module")
def served(cluster: Cluster, weights: Path, onnx_cache_dir: Path, targets_dir: Path) -> str:
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    options = ray_serve.ReplicaOptions(
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=TARGET,
        upscale_delay_s=0,
        downscale_delay_s=2,
        metrics_interval_s=0.5,
        look_back_period_s=2,
        num_cpus=REPLICA_CPUS,
        metrics_port=0,
        metrics_sd_dir=str(targets_dir),
        settings={
            "models": ["resnet18v1"],
            "weights_dir": str(weights),
            "missing_weights": "fail",
            "device": "cpu",
            "runtime": "torch",
            "torch_threads": 1,
            "decode_workers": 1,
            "onnx_cache_dir": str(onnx_cache_dir),
        },
    )
    serve.run(ray_serve.build(options), name=APP, route_prefix="/", blocking=False)
    wait_for(lambda: running_replicas() == 1, 180, "the first replica")
    return f"http://127.0.0.1:{port}"


def running_replicas() -> int:
    status = serve.status().applications.get(APP)
    if status is None:
        return 0
    deployment = status.deployments.get(ray_serve.DEPLOYMENT_NAME)
    return 0 if deployment is None else int(deployment.replica_states.get("RUNNING", 0))


def replica_nodes() -> list[str]:
    """The node ids of the live replica actors."""
    actors: dict[str, Any] = ray._private.state.actors()
    return [
        actor["Address"]["NodeID"]
        for actor in actors.values()
        if actor["State"] == "ALIVE" and f"{ray_serve.DEPLOYMENT_NAME}" in actor["ActorClassName"]
    ]


def predict(base: str, photo: bytes, client: httpx.Client) -> httpx.Response:
    return client.post(f"{base}/resnet18v1/predict?topk=5", files={"data": ("photo.jpg", photo, "image/jpeg")})


def test_answers_match_the_reference_forward(served, weights, photos):
    with httpx.Client(timeout=30) as client:
        for name in ("kitten.jpg", "coffee.jpg"):
            response = predict(served, photos[name], client)
            assert response.status_code == 200, response.text
            (answer,) = response.json()["prediction"]
            assert_matches(answer, reference_probabilities(weights, "resnet18v1", "resnet18", photos[name]), 5)
        # The KServe v2 routes come through Ray's proxy too: the app is the same.
        assert client.get(f"{served}/v2/health/ready").status_code == 200


@pytest.fixture(scope="module")
def prometheus(served: str, targets_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A real Prometheus whose job `resnet-serve` (the dashboard's) finds the replicas by file_sd."""
    directory = tmp_path_factory.mktemp("ray-prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "resnet-serve",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "file_sd_configs": [{"files": [str(targets_dir / "*.json")], "refresh_interval": "1s"}],
            }
        ],
    }
    with running_prometheus(directory, config) as instance:
        yield instance


def test_replica_metrics_reach_prometheus(served, prometheus, photos):
    served_ok = 'sum(resnet_serve_requests_total{job="resnet-serve", model="resnet18v1", code="200"})'
    wait_until(lambda: prometheus.value('count(up{job="resnet-serve"} == 1)') == running_replicas(), 30, "scrapes")
    before = prometheus.value(served_ok) or 0.0
    with httpx.Client(timeout=30) as client:
        for _ in range(3):
            assert predict(served, photos["coffee.jpg"], client).status_code == 200
    # Every answer counted once, by the replica that gave it: the dashboard's sums see them all.
    wait_until(lambda: prometheus.value(served_ok) == before + 3, 30, "the 3 answers in Prometheus")


async def closed_loop(base: str, photo: bytes, clients: int, stop: asyncio.Event) -> list[int]:
    statuses: list[int] = []

    async def one_client(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            response = await client.post(
                f"{base}/resnet18v1/predict", files={"data": ("photo.jpg", photo, "image/jpeg")}
            )
            statuses.append(response.status_code)

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(one_client(client) for _ in range(clients)))
    return statuses


async def load_until(base: str, photo: bytes, condition: Callable[[], bool], timeout_s: float) -> list[int]:
    """Closed-loop load until `condition` holds (polled off the loop) or the timeout; every status."""
    stop = asyncio.Event()
    load = asyncio.create_task(closed_loop(base, photo, CLIENTS, stop))
    deadline = time.monotonic() + timeout_s
    try:
        while not await asyncio.to_thread(condition):
            if time.monotonic() > deadline or load.done():
                break
            await asyncio.sleep(0.5)
        reached = await asyncio.to_thread(condition)
    finally:
        stop.set()
        statuses = await load
    assert reached, f"not reached within {timeout_s} s under {CLIENTS} clients ({len(statuses)} requests)"
    return statuses


def test_scales_up_under_load_and_back_down(served, photos):
    assert running_replicas() == 1
    statuses = asyncio.run(load_until(served, photos["kitten.jpg"], lambda: running_replicas() == 2, 180))
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    # Two replicas on two different worker nodes (each has room for one).
    assert len(set(replica_nodes())) == 2
    # Down to one replica, and the other's actor gone once its drain ended.
    wait_for(lambda: running_replicas() == 1 and len(replica_nodes()) == 1, 120, "the scale-down after the load")


def test_survives_losing_the_node_of_its_replica(cluster, served, weights, photos):
    wait_for(lambda: running_replicas() == 1 and len(replica_nodes()) == 1, 120, "one replica")
    (node_id,) = replica_nodes()
    (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
    cluster.remove_node(node, allow_graceful=False)
    data = photos["kitten.jpg"]
    expected = reference_probabilities(weights, "resnet18v1", "resnet18", data)
    with httpx.Client(timeout=30) as client:

        def answered() -> bool:
            try:
                return predict(served, data, client).status_code == 200
            except httpx.HTTPError:
                return False

        # Ray notices the dead node's replica and starts another on the surviving worker.
        wait_for(answered, 180, "an answer after the node loss", poll_s=1)
        assert running_replicas() == 1
        (survivor,) = replica_nodes()
        assert survivor != node_id
        for _ in range(5):
            response = predict(served, data, client)
            assert response.status_code == 200, response.text
            (answer,) = response.json()["prediction"]
            assert_matches(answer, expected, 5)


def test_target_matches_the_manifests():
    """The adapter's T is the Kubernetes overlay's and the RayService sample's."""
    overlay = yaml.safe_load((REPO / "deploy/k8s/overlays/cpu/scaling-target.yaml").read_text())
    assert int(overlay["data"]["targetInFlightPerReplica"]) == ray_serve.TARGET_ONGOING_REQUESTS
    sample = yaml.safe_load((REPO / "deploy/k8s/ray/rayservice.yaml").read_text())
    (application,) = yaml.safe_load(sample["spec"]["serveConfigV2"])["applications"]
    (deployment,) = application["deployments"]
    assert deployment["name"] == ray_serve.DEPLOYMENT_NAME
    assert deployment["autoscaling_config"]["target_ongoing_requests"] == ray_serve.TARGET_ONGOING_REQUESTS
    options = ray_serve.deployment_options(ray_serve.ReplicaOptions())
    assert options["graceful_shutdown_timeout_s"] == deployment["graceful_shutdown_timeout_s"]


def test_options_follow_the_settings():
    """The kill waits for the server's own grace; a CUDA device asks Ray for one GPU a replica."""
    cpu = ray_serve.deployment_options(ray_serve.ReplicaOptions(settings={"shutdown_grace_s": 12}))
    assert cpu["graceful_shutdown_timeout_s"] == 12 + ray_serve.DRAIN_MARGIN_S
    assert cpu["ray_actor_options"]["num_gpus"] == 0
    assert cpu["autoscaling_config"]["target_ongoing_requests"] == ray_serve.TARGET_ONGOING_REQUESTS
    gpu = ray_serve.deployment_options(ray_serve.ReplicaOptions(settings={"device": "cuda"}))
    assert gpu["ray_actor_options"]["num_gpus"] == 1
    with pytest.raises(ValueError, match="max_replicas"):
        ray_serve.deployment_options(ray_serve.ReplicaOptions(min_replicas=3, max_replicas=2))
