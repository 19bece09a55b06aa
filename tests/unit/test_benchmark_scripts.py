"""The benchmark scripts still run: those that need no server, and the load generator against a stub."""

from __future__ import annotations

import asyncio
import http.server
import threading

from benchmarks import decode_routes, loadgen, model_path
from benchmarks.photos import load_photos


def test_model_path_prints_the_path_against_the_bare_forward(capsys):
    assert model_path.main(["--arch", "resnet18", "--batch-size", "2", "--seconds", "0.1", "--device", "cpu"]) == 0
    rows = {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows == {"bare", "path", "overlap"}


def test_decode_routes_compare_each_route_with_the_exact_one(capsys):
    assert decode_routes.main(["--seconds", "0.05"]) == 0
    lines = capsys.readouterr().out.splitlines()
    exact = next(line for line in lines if line.startswith("exact"))
    assert exact.split()[2:] == ["1.00x", "0.000", "0", "0.00e+00"]  # the exact route against itself
    assert {line.split()[0] for line in lines[2:]} == set(decode_routes.ROUTES)


class _Counts(http.server.BaseHTTPRequestHandler):
    """Answers every POST with a tiny JSON body and counts them."""

    protocol_version = "HTTP/1.1"
    answered = 0
    lock = threading.Lock()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b'{"prediction": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with _Counts.lock:
            _Counts.answered += 1

    def log_message(self, *args):
        pass


def test_loadgen_splits_the_clients_over_processes_and_adds_up_their_answers():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counts)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        target = loadgen.Target(f"http://127.0.0.1:{server.server_address[1]}", "/m/predict", "data", None)
        photos = load_photos()[:2]
        result = asyncio.run(loadgen.run_level(target, photos, concurrency=3, duration_s=1.0, processes=2))
    finally:
        server.shutdown()
        server.server_close()
    assert result.errors == {}
    assert result.ok == _Counts.answered > 0
    assert result.mode == "closed" and result.level == 3
