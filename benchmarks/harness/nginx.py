"""nginx (Debian's, scripts/install-nginx.sh) as a round-robin proxy in front of resnet-serve
processes: its configuration, start and graceful stop. Used by benchmarks/proxy.py and by
tests/integration/test_scaling_signal.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from benchmarks.harness.server import HOST, wait_ready

INSTALL_HINT = "scripts/install-nginx.sh installs it"


def find_nginx() -> str | None:
    """The nginx binary: on PATH, or Debian's /usr/sbin (not on a plain user's PATH)."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def config(directory: Path, listeners: Mapping[int, Sequence[int]]) -> str:
    """One `server` per listening port, each a round robin over its backends' ports.

    A request whose backend fails (refused, reset, timed out, 502/503) goes to the next backend.
    POST is not idempotent, so nginx retries it only with `non_idempotent`: safe for predictions,
    which change nothing. Uploads stay in memory (`client_body_buffer_size`), so a retry can resend
    them, and connections to the backends are kept alive as a production proxy's are."""
    # As root, nginx would hand its workers to `nobody`, who cannot enter private temporary folders.
    user = "user root;" if os.geteuid() == 0 else ""
    blocks = []
    for index, (port, backends) in enumerate(listeners.items()):
        servers = "\n".join(f"        server {HOST}:{p} max_fails=1 fail_timeout=30s;" for p in backends)
        blocks.append(f"""
    upstream pool{index} {{
{servers}
        keepalive 32;
    }}
    server {{
        listen {HOST}:{port};
        location / {{
            proxy_pass http://pool{index};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 2;
            proxy_read_timeout 60s;
        }}
    }}""")
    return f"""{user}
worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    client_max_body_size 10m;
    client_body_buffer_size 10m;
{"".join(blocks)}
}}
"""


@contextlib.contextmanager
def running(binary: str, directory: Path, listeners: Mapping[int, Sequence[int]]) -> Iterator[list[str]]:
    """nginx with `config(...)`, ready on every listening port (each answers /ping through a backend);
    yields their base URLs, and stops it gracefully (SIGQUIT) on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "nginx.conf"
    path.write_text(config(directory, listeners))
    check = subprocess.run([binary, "-t", "-p", str(directory), "-c", str(path)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"nginx refused its configuration:\n{check.stderr}")
    process = subprocess.Popen([binary, "-p", str(directory), "-c", str(path)], stderr=subprocess.DEVNULL)
    urls = [f"http://{HOST}:{port}" for port in listeners]
    try:
        for url in urls:
            wait_ready(url, "/ping", timeout_s=30, process=process)
        yield urls
    finally:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
