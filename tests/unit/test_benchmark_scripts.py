"""The benchmark scripts still run: those that need no server, the load generator against a stub,
and the harness under them (metrics lookups, process stats over a tree, readiness, stop)."""

from __future__ import annotations

import asyncio
import http.server
import json
import subprocess
import sys
import threading
import time

import psutil
import pytest

from benchmarks import ceilings, decode_routes, loadgen, model_path
from benchmarks.harness.http import Target
from benchmarks.harness.load import run_level
from benchmarks.harness.metrics import Metrics, ServerStats, scrape
from benchmarks.harness.server import ServerProcess, free_port, process_stats, wait_ready
from benchmarks.photos import load_photos


def test_model_path_prints_the_path_against_the_bare_forward(capsys):
    assert model_path.main(["--arch", "resnet18", "--batch-size", "2", "--seconds", "0.1", "--device", "cpu"]) == 0
    rows = {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows == {"bare", "path", "overlap"}


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_the_forward_ceiling_runs_each_runtime(runtime, tmp_path, capsys):
    out = tmp_path / "ceilings.json"
    argv = ["--threads", "1", "--batch-sizes", "2", "--seconds", "0.1", "--no-decode", "--runtime", runtime]
    assert ceilings.main([*argv, "--json", str(out)]) == 0
    forward = json.loads(out.read_text())["forward"]["2"]
    assert forward["runtime"] == runtime and forward["iterations"] >= 3 and forward["img_s"] > 0
    assert f"resnet18 {runtime} batch  2" in capsys.readouterr().out


def test_decode_routes_compare_each_route_with_the_exact_one(capsys):
    assert decode_routes.main(["--seconds", "0.05"]) == 0
    lines = capsys.readouterr().out.splitlines()
    exact = next(line for line in lines if line.startswith("exact"))
    assert exact.split()[2:] == ["1.00x", "0.000", "0", "0.00e+00"]  # the exact route against itself
    assert {line.split()[0] for line in lines[2:]} == set(decode_routes.ROUTES)


class _Stub(http.server.BaseHTTPRequestHandler):
    """Answers every POST with a tiny JSON body and counts them; /ping says 200 and /metrics
    reports each answer as a forward of 2 images, the way resnet-serve's histograms would."""

    protocol_version = "HTTP/1.1"
    answered = 0
    lock = threading.Lock()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(b'{"prediction": []}', "application/json")
        with _Stub.lock:
            _Stub.answered += 1

    def do_GET(self):
        if self.path == "/metrics":
            text = (
                "# TYPE resnet_serve_batch_size histogram\n"
                f'resnet_serve_batch_size_count{{model="m"}} {_Stub.answered}\n'
                f'resnet_serve_batch_size_sum{{model="m"}} {2 * _Stub.answered}\n'
            )
            self._answer(text.encode(), "text/plain; version=0.0.4")
        else:
            self._answer(b'{"status": "Healthy"}', "application/json")

    def _answer(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Stub.answered = 0
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_loadgen_splits_the_clients_over_processes_and_adds_up_their_answers(stub):
    target = Target(stub, "/m/predict", "data", None)
    photos = load_photos()[:2]
    result = asyncio.run(run_level(target, photos, concurrency=3, duration_s=1.0, processes=2))
    assert result.errors == {}
    assert result.ok == _Stub.answered > 0
    assert result.mode == "closed" and result.level == 3


def test_loadgen_command_line_prints_the_table_with_the_servers_batch_size(stub, capsys):
    argv = ["--url", stub, "--route", "/m/predict", "--model", "m", "--concurrency", "1", "--requests", "5",
            "--duration", "5", "--warmup", "0"]  # fmt: skip
    assert loadgen.main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("A http")]
    assert rows, "no result row"
    ok, errors, batch = rows[-1][-4:-1]
    assert (ok, errors, batch) == ("5", "0", "2.00")  # 5 answers, each counted as a forward of 2 images


TEXT = """# TYPE resnet_serve_images counter
resnet_serve_images_total{model="a"} 3.0
resnet_serve_images_total{model="b"} 4.0
# TYPE resnet_serve_rejected counter
resnet_serve_rejected_total{model="a",reason="deadline"} 1.0
resnet_serve_rejected_total{model="a",reason="full"} 5.0
# TYPE resnet_serve_ready gauge
resnet_serve_ready 1.0
"""


def test_metrics_are_looked_up_by_name_and_a_subset_of_labels():
    metrics = Metrics.parse(TEXT)
    assert metrics.value("resnet_serve_images_total", {"model": "b"}) == 4.0
    assert metrics.total("resnet_serve_images_total") == 7.0
    assert metrics.total("resnet_serve_rejected_total", {"model": "a"}) == 6.0
    assert metrics.value("resnet_serve_rejected_total", {"model": "a", "reason": "deadline"}) == 1.0
    assert metrics.value("resnet_serve_ready") == 1.0
    assert metrics.value("resnet_serve_images_total", {"model": "c"}) == 0.0
    assert metrics.value("nothing", default=-1.0) == -1.0


def test_server_stats_are_the_deltas_of_one_models_histograms():
    def text(count: int, total: float) -> str:
        return (
            "# TYPE resnet_serve_batch_size histogram\n"
            f'resnet_serve_batch_size_count{{model="a"}} {count}\nresnet_serve_batch_size_sum{{model="a"}} {total}\n'
            'resnet_serve_batch_size_count{model="b"} 100\nresnet_serve_batch_size_sum{model="b"} 800\n'
        )

    stats = ServerStats.from_delta(Metrics.parse(text(2, 4)), Metrics.parse(text(6, 20)), "a")
    assert (stats.batches, stats.images, stats.mean_batch) == (4, 16, 4.0)


def test_a_scrape_of_nothing_listening_is_none():
    assert scrape(f"http://127.0.0.1:{free_port()}/metrics", timeout_s=2) is None


def _python(code: str, **popen: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code], **popen)  # type: ignore[call-overload]


def test_process_stats_add_up_the_process_tree():
    child = "import time; time.sleep(60)"
    parent = _python(
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    )
    try:
        deadline = time.monotonic() + 30
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        root, tree = process_stats(parent.pid), process_stats(parent.pid, tree=True)
        (child,) = psutil.Process(parent.pid).children()
        alone = process_stats(child.pid)
    finally:
        for process in psutil.Process(parent.pid).children():
            process.kill()
        parent.kill()
        parent.wait()
    assert root.rss_bytes > 0 and root.threads >= 1 and root.open_fds >= 3
    assert tree.rss_bytes > root.rss_bytes
    assert tree.threads == root.threads + alone.threads


def test_waiting_for_a_server_that_exits_fails_at_once_with_its_log(tmp_path):
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = _python("print('startup failed: no weights'); raise SystemExit(3)", stdout=out)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exited with 3:\nstartup failed: no weights"):
        wait_ready(f"http://127.0.0.1:{free_port()}", timeout_s=60, process=process, log_path=log)
    assert time.monotonic() - started < 30


def test_stop_kills_a_process_that_ignores_sigterm_and_returns_its_code(tmp_path):
    log = tmp_path / "server.log"
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ignoring', flush=True); "
    code += "time.sleep(60)"
    with log.open("wb") as out:
        server = ServerProcess(_python(code, stdout=out), free_port(), log)
    deadline = time.monotonic() + 30
    while "ignoring" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stop(timeout_s=0.5) == -9
