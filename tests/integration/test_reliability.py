"""Overload, deadlines, disconnects, SIGTERM and startup failures, against a live server process."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from service.models.catalog import CATALOG
from service.models.weights import write_random
from tests.conftest import REPO
from tests.integration.live import LiveServer, free_port, multipart_request, open_loop, running, spawn, wait_ready

pytestmark = pytest.mark.integration


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


SETTLE_S = 2.5  # longer than the server's idle trim (a second after the last forward)


def test_overload_is_refused_fast_and_accepted_work_completes(weights, tmp_path, photos):
    image = photos["kitten_small.jpg"]
    args = ("--max-batch-size", "8", "--max-queue-size", "16", "--request-timeout-s", "10")
    with running(weights, tmp_path / "server.log", *args) as server:
        # Capacity first, then about 10x it for a while (60 s in benchmarks/overload.py; shorter here).
        request = multipart_request(image)
        # Warm up with a short burst of the same shape, so allocator pools and pool threads exist
        # before the RSS baseline is read.
        warm_up = asyncio.run(open_loop(server.port, request, rate=300, duration_s=3))
        # RSS at rest: the server trims its heap a second after its last forward, so a reading taken
        # mid-burst would count free pages it is about to give back (tens of MiB either way).
        time.sleep(SETTLE_S)
        rss_before = server.rss_bytes()
        results = asyncio.run(open_loop(server.port, request, rate=300, duration_s=8))
        ready_after = httpx.get(f"{server.url}/ping", timeout=2).status_code
        images_computed = server.metric("resnet_serve_images_total", model="resnet18v1")
        expired = server.metric("resnet_serve_rejected_total", model="resnet18v1", reason="deadline")
        time.sleep(SETTLE_S)
        rss_after = server.rss_bytes()
    by_status: dict[int, list[float]] = {}
    for status, seconds in results:
        by_status.setdefault(status, []).append(seconds)
    ok, refused = by_status.get(200, []), by_status.get(429, [])
    # 0 would be a reset: a refusal the client never got to read (see accounting.linger).
    assert set(by_status) <= {200, 429}, {k: len(v) for k, v in by_status.items()}
    assert len(refused) > len(ok), "the burst was meant to be far beyond capacity"
    assert ok, "accepted requests must still complete"
    # Refusals happen before the body is read or decoded. The issue asks p99 < 50 ms; the bound
    # here is 2x that because the load generator shares the server's 2 cores in CI.
    assert percentile(refused, 0.99) < 0.1, percentile(refused, 0.99)
    assert max(ok) < 10  # every accepted request finished inside request_timeout_s
    assert ready_after == 200
    assert expired == 0
    served_ok = len(ok) + sum(status == 200 for status, _ in warm_up)
    assert images_computed == served_ok  # nothing refused was computed
    assert rss_after <= rss_before * 1.05, (rss_before, rss_after)


def test_clients_that_disconnect_while_queued_are_dropped_before_the_forward(weights, tmp_path, photos):
    args = ("--max-batch-size", "8", "--max-delay-ms", "1500", "--max-queue-size", "64")
    with running(weights, tmp_path / "server.log", *args) as server:
        computed_before = server.metric("resnet_serve_images_total", model="resnet18v1")
        sockets = [_send(server.port, multipart_request(photos["kitten_small.jpg"])) for _ in range(5)]
        deadline = time.monotonic() + 5
        while server.metric("resnet_serve_queue_depth", model="resnet18v1") < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        for sock in sockets:
            sock.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if server.metric("resnet_serve_rejected_total", model="resnet18v1", reason="disconnected") >= 5:
                break
            time.sleep(0.05)
        time.sleep(1.6)  # past the batch window: anything still queued would have run by now
        dropped = server.metric("resnet_serve_rejected_total", model="resnet18v1", reason="disconnected")
        computed_after = server.metric("resnet_serve_images_total", model="resnet18v1")
        still_serving = httpx.post(
            f"{server.url}/resnet18v1/predict", files={"data": photos["kitten_small.jpg"]}, timeout=30
        )
    assert dropped == 5
    assert computed_after == computed_before
    assert still_serving.status_code == 200


def test_sigterm_answers_every_admitted_request_and_refuses_new_ones(weights, tmp_path, photos):
    image = photos["kitten.jpg"]
    server = spawn(weights, tmp_path / "server.log", "--max-queue-size", "64", "--shutdown-grace-s", "20")
    try:
        wait_ready(server)

        async def scenario() -> tuple[list[int], list[str], float]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                inflight = [
                    asyncio.create_task(http.post("/resnet18v1/predict", files={"data": ("k.jpg", image)}))
                    for _ in range(24)
                ]
                # Wait until all 24 are admitted (in flight or already answered) before SIGTERM.
                async with httpx.AsyncClient(base_url=server.url, timeout=5) as probe:
                    for _ in range(500):
                        metrics = (await probe.get("/metrics")).text
                        answered = sum(task.done() for task in inflight)
                        admitted = _gauge(metrics, "resnet_serve_inflight_requests") + answered
                        if admitted >= 24:
                            break
                        await asyncio.sleep(0.01)
                server.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                after = []
                for _ in range(5):
                    await asyncio.sleep(0.05)
                    try:
                        async with httpx.AsyncClient(base_url=server.url, timeout=10) as fresh:
                            late = await fresh.post("/resnet18v1/predict", files={"data": ("k.jpg", image)})
                            after.append(str(late.status_code))
                    except httpx.ConnectError:
                        after.append("refused")
                statuses = [(await task).status_code for task in inflight]
                return statuses, after, signalled

        statuses, after, signalled = asyncio.run(scenario())
        code = server.process.wait(timeout=25)
        exited_after = time.monotonic() - signalled
    finally:
        server.stop(signal.SIGKILL)
    assert statuses == [200] * 24, statuses
    assert set(after) <= {"503", "refused"}, after
    assert code == 0
    assert exited_after < 20
    assert "draining" in server.log()


@pytest.mark.parametrize("grace", ["0", "0.5"])
def test_a_hung_forward_is_cancelled_at_the_grace_and_the_process_exits_1_saying_so(weights, tmp_path, photos, grace):
    """A forward that never returns: the request is cancelled when the grace ends (0 means at once,
    never "wait for ever"), and as the forward thread can never be joined, the process exits 1 a
    fixed margin later with one line that says why."""
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.stubs", "hung-forward", str(weights), str(port), grace],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = LiveServer(process, port, log_path)
    request: socket.socket | None = None
    try:
        wait_ready(server)
        request = _send(port, multipart_request(photos["kitten_small.jpg"]))
        _wait_for_log(server, "forward entered")
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        server.stop(signal.SIGKILL)
        if request is not None:
            request.close()
    log = server.log()
    assert code == 1, log
    cancelled = log.find("timeout graceful shutdown exceeded")
    killed = log.find("killed: work was still running")
    assert 0 <= cancelled < killed, log
    assert log.count("killed: work was still running") == 1


def test_connections_over_the_cap_are_answered_503(weights, tmp_path):
    """A cap of 2 serves 2 connections at once (uvicorn's own check would serve 1); the third gets
    our JSON 503."""

    def get(sock: socket.socket) -> bytes:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        return sock.recv(65536)

    with running(weights, tmp_path / "server.log", "--max-connections", "2") as server:
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
        try:
            assert [get(sock).split(b"\r\n", 1)[0] for sock in held] == [b"HTTP/1.1 200 OK"] * 2
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as third:
                answer = get(third)
                while chunk := third.recv(65536):  # the server closes after the refusal
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 503 ")
                assert b'"type":"ServiceUnavailable"' in answer.replace(b" ", b"")
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 10  # the server notices the closed connections
        while httpx.get(f"{server.url}/health/live", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "still refused after the held connections closed"
            time.sleep(0.05)


def _wait_for_log(server: LiveServer, text: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in server.log():
        assert time.monotonic() < deadline, f"{text!r} not logged within {timeout_s} s:\n{server.log()}"
        time.sleep(0.05)


def _send(port: int, request: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request)
    return sock


def _gauge(metrics_text: str, name: str) -> int:
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    return 0


@pytest.mark.parametrize("problem", ["truncated", "wrong_architecture", "wrong_label_count"])
def test_bad_weights_stop_startup_with_one_clear_line(tmp_path, problem):
    weights = tmp_path / "w"
    path = write_random(CATALOG["resnet18v1"], 0, weights)
    expected = {
        "truncated": "is not a readable checkpoint",
        "wrong_architecture": "does not fit the resnet18 architecture",
        "wrong_label_count": "has 3 labels but",
    }[problem]
    if problem == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif problem == "wrong_architecture":
        path.unlink()
        write_random(CATALOG["resnet34v1"], 0, weights).rename(path)
    else:
        (weights / "resnet18v1.labels.txt").write_text("a\nb\nc\n")
    server = spawn(weights, tmp_path / "server.log")
    healthy_seen = False
    deadline = time.monotonic() + 60
    while server.process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            healthy_seen |= httpx.get(f"{server.url}/ping", timeout=1).status_code == 200
        time.sleep(0.05)
    code = server.stop(signal.SIGKILL, timeout_s=1)
    log = server.log()
    assert code == 1, log
    assert not healthy_seen
    failures = [line for line in log.splitlines() if "startup failed" in line]
    assert failures, log
    assert expected in failures[-1]
    assert "Traceback" not in log
