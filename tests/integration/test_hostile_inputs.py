"""Hostile uploads and hostile requests against one live server (issue 5, "Hostile inputs").

Every item of tests/hostile_corpus.py goes to a real uvicorn process, as a multipart `data` part and
as a raw body: each gets its expected status within a second, and a 4xx gets a JSON body that names
the problem. Then the request-level attacks: wrong or missing parts, 10,000 parts, a 1 MB filename,
a 50 MB upload, a body that stops halfway or stalls, path traversal in the model name. Last, the
corpus runs again while the server's threads, file descriptors and memory are watched for leaks.

The attacks that must be answered before the body is complete use a raw socket: the test sends the
headers and a little of the body, then reads the answer without sending the rest.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.models.catalog import CATALOG
from service.models.weights import write_random
from tests.conftest import REPO
from tests.hostile_corpus import FORBIDDEN_IN_RESPONSES, Hostile, corpus
from tests.integration.live import LiveServer, running

pytestmark = pytest.mark.integration

MODEL = "resnet18v1"
PREDICT = f"/{MODEL}/predict"
DECODE_WORKERS = 2
# Short, so the stalled-upload tests learn within seconds whether the server enforces it.
REQUEST_TIMEOUT_S = 3.0
PER_REQUEST_LIMIT_S = 1.0
TRANSPORTS = ("multipart", "raw")


# --- the server and the ways to talk to it -------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hostile-weights")
    write_random(CATALOG[MODEL], 0, directory)
    return directory


@pytest.fixture(scope="module")
def server(hostile_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("hostile-log") / "server.log"
    args = ["--device", "cpu", "--decode-workers", str(DECODE_WORKERS), "--request-timeout-s", str(REQUEST_TIMEOUT_S)]
    with running(hostile_weights, log, *args) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def good_photo(photos: dict[str, bytes]) -> bytes:
    return photos["kitten_small.jpg"]


def post_item(http: httpx.Client, item: Hostile, transport: str) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    if transport == "multipart":
        response = http.post(PREDICT, files=[("data", (f"{item.name}.bin", item.data, "application/octet-stream"))])
    else:
        response = http.post(PREDICT, content=item.data, headers={"content-type": "application/octet-stream"})
    return response, time.perf_counter() - started


def assert_no_leaks(text: str) -> None:
    for word in FORBIDDEN_IN_RESPONSES:
        assert word not in text, f"the response leaks {word!r}: {text[:500]}"


def error_body(status: int, text: str) -> dict[str, Any]:
    """The JSON error body, checked for its shape and for what it must not say."""
    assert_no_leaks(text)
    body = json.loads(text)
    assert set(body) == {"code", "type", "message"}, body
    assert body["code"] == status, body
    assert isinstance(body["type"], str) and isinstance(body["message"], str) and body["message"], body
    return body


def check_outcome(item: Hostile, transport: str, status: int, text: str, elapsed_s: float) -> None:
    where = f"{item.name} ({transport})"
    assert status in item.expected, f"{where}: got {status}, expected {sorted(item.expected)}: {text[:300]}"
    assert elapsed_s < PER_REQUEST_LIMIT_S, f"{where}: took {elapsed_s:.2f}s"
    if status == 200:
        assert_no_leaks(text)
        prediction = json.loads(text)["prediction"]
        assert len(prediction) == 1 and len(prediction[0]) == 5, prediction
        return
    message = error_body(status, text)["message"].lower()
    if item.mentions:
        assert any(word.lower() in message for word in item.mentions), f"{where}: {message!r} names no problem"


def assert_serving(http: httpx.Client, photo: bytes, *, within_s: float = 5.0) -> None:
    """A good photo gets 200, now or (after a disconnect the server is still cleaning up) soon."""
    deadline = time.monotonic() + within_s
    while True:
        response = http.post(PREDICT, files=[("data", ("kitten.jpg", photo, "image/jpeg"))])
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert response.status_code == 200, response.text
    assert len(response.json()["prediction"][0]) == 5


# --- raw sockets, for what must be answered before the body is all there --------------------------


def request_head(path: str, content_type: str, content_length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {content_length}\r\n\r\n"
    ).encode("latin-1")


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body, read off `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection without a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def raw_exchange(server: LiveServer, head: bytes, partial_body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send the head and only `partial_body`, then read the answer; the rest of the body is never sent."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + partial_body)
        return read_response(sock)


def part(name: str, data: bytes, *, filename: bytes = b"x.jpg", boundary: bytes = b"B") -> bytes:
    return (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name.encode() + b'"; filename="'
        + filename + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + data + b"\r\n"
    )  # fmt: skip


# --- the corpus -------------------------------------------------------------------------------------


def corpus_params() -> list[Any]:
    params = []
    for item in corpus():
        marks = [pytest.mark.xfail(strict=True, reason=item.known_bug)] if item.known_bug else []
        params.append(pytest.param(item, id=item.name, marks=marks))
    return params


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("item", corpus_params())
def test_each_hostile_upload_gets_its_expected_answer(http, item, transport):
    response, elapsed = post_item(http, item, transport)
    check_outcome(item, transport, response.status_code, response.text, elapsed)


# --- request-level attacks --------------------------------------------------------------------------


def test_wrong_multipart_field_name_is_400_naming_the_field(http, good_photo):
    response = http.post(PREDICT, files=[("image", ("kitten.jpg", good_photo, "image/jpeg"))])
    message = error_body(400, response.text)["message"]
    assert response.status_code == 400
    assert "'data'" in message and "'image'" in message


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'--B\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--B--\r\n', id="text-field"),
        pytest.param(b"--B--\r\n", id="no-parts-at-all"),
        pytest.param(b"", id="empty-body"),
        pytest.param(b"this is not multipart at all", id="garbage"),
    ],
)
def test_multipart_without_a_file_part_is_400(http, body):
    response = http.post(PREDICT, content=body, headers={"content-type": "multipart/form-data; boundary=B"})
    assert response.status_code == 400, response.text
    message = error_body(400, response.text)["message"]
    assert "no image" in message or "malformed" in message, message


def test_multipart_without_a_boundary_is_400(http, good_photo):
    response = http.post(PREDICT, content=good_photo, headers={"content-type": "multipart/form-data"})
    assert response.status_code == 400
    assert "boundary" in error_body(400, response.text)["message"]


def test_a_boundary_over_256_bytes_is_400(http, good_photo):
    boundary = b"B" * 5000
    body = part("data", good_photo, boundary=boundary) + b"--" + boundary + b"--\r\n"
    response = http.post(PREDICT, content=body, headers={"content-type": f"multipart/form-data; boundary={'B' * 5000}"})
    assert response.status_code == 400
    assert "boundary" in error_body(400, response.text)["message"].lower()


@pytest.mark.parametrize("topk", ["99999999999999999999999", "-1", "0", "1001", "abc", "1e3", "", "5%00"])
def test_a_hostile_topk_is_400(http, good_photo, topk):
    response = http.post(f"{PREDICT}?topk={topk}", content=good_photo)
    assert response.status_code == 400, response.text
    assert "topk" in error_body(400, response.text)["message"]


TINY_PART = part("data", b"x", filename=b"x")
TEN_THOUSAND_PARTS = TINY_PART * 10_000 + b"--B--\r\n"


def test_ten_thousand_parts_are_refused_before_the_body_ends(server):
    # 200 of the 10,000 parts are sent; the answer must come without the other 9,800.
    head = request_head(PREDICT, "multipart/form-data; boundary=B", len(TEN_THOUSAND_PARTS))
    started = time.perf_counter()
    status, _, body = raw_exchange(server, head, TINY_PART * 200)
    assert time.perf_counter() - started < PER_REQUEST_LIMIT_S
    assert status == 400
    assert "too many parts" in error_body(400, body.decode())["message"]


def test_ten_thousand_parts_sent_in_full_are_refused_fast(http):
    started = time.perf_counter()
    response = http.post(
        PREDICT, content=TEN_THOUSAND_PARTS, headers={"content-type": "multipart/form-data; boundary=B"}
    )
    assert time.perf_counter() - started < PER_REQUEST_LIMIT_S
    assert response.status_code == 400
    assert "too many parts" in error_body(400, response.text)["message"]


def test_a_one_megabyte_filename_is_400(http, good_photo):
    body = part("data", good_photo, filename=b"A" * (1 << 20)) + b"--B--\r\n"
    started = time.perf_counter()
    response = http.post(PREDICT, content=body, headers={"content-type": "multipart/form-data; boundary=B"})
    assert time.perf_counter() - started < PER_REQUEST_LIMIT_S
    assert response.status_code == 400, response.text[:300]
    assert "header" in error_body(400, response.text)["message"]


@pytest.mark.parametrize(
    ("content_type", "first_bytes"),
    [
        pytest.param("application/octet-stream", b"\xff\xd8\xff\xe0" + b"\x00" * 996, id="raw"),
        pytest.param("multipart/form-data; boundary=B", part("data", b"\xff\xd8" + b"\x00" * 900), id="multipart"),
    ],
)
def test_fifty_megabytes_declared_is_413_before_the_body_is_read(server, content_type, first_bytes):
    head = request_head(PREDICT, content_type, 50 * 1024 * 1024)
    started = time.perf_counter()
    status, headers, body = raw_exchange(server, head, first_bytes)
    assert time.perf_counter() - started < PER_REQUEST_LIMIT_S
    assert status == 413
    assert headers.get("connection") == "close"  # the unread 50 MB cannot share the connection
    assert "limit" in error_body(413, body.decode())["message"]


def test_a_chunked_upload_without_content_length_is_cut_at_the_cap(server, http, good_photo):
    """No Content-Length to refuse up front: the server counts the chunks and stops at 10 MiB."""
    chunk = b"\x00" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        # Send up to 50 MB, a chunk at a time, until the server has something to say.
        while sent < 50 * 1024 * 1024 and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        status, _, body = read_response(sock)
    assert status == 413
    # What the socket took overstates what the server read: the kernel buffers several MB on each
    # side of a loopback connection. The point is the answer long before the 50 MB are sent.
    assert sent < 30 * 1024 * 1024, f"{sent} bytes went out before the server refused"
    assert "limit" in error_body(413, body.decode())["message"]
    assert_serving(http, good_photo)


def test_oversized_request_headers_are_refused(server, good_photo):
    head = request_head(PREDICT, "application/octet-stream", len(good_photo))
    huge = head.replace(b"\r\n\r\n", b"\r\nX-Padding: " + b"a" * (1 << 20) + b"\r\n\r\n")
    try:
        status, _, _ = raw_exchange(server, huge, good_photo)
    except ConnectionError:  # not TimeoutError: a server that hangs has not refused anything
        return  # dropping the connection is a refusal too
    assert status in (400, 413, 431)


def test_a_body_that_stops_halfway_leaves_the_server_serving(server, http, good_photo):
    before = server.metric("resnet_serve_rejected_total", model=MODEL, reason="disconnected")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request_head(PREDICT, "application/octet-stream", 200_000) + good_photo[:1000])
    deadline = time.monotonic() + 5
    while server.metric("resnet_serve_rejected_total", model=MODEL, reason="disconnected") <= before:
        assert time.monotonic() < deadline, "the server never noticed the client had gone"
        time.sleep(0.05)
    assert server.process.poll() is None
    assert_serving(http, good_photo)


def test_a_stalled_upload_is_answered_within_the_request_timeout(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=REQUEST_TIMEOUT_S + 3) as sock:
        sock.sendall(request_head(PREDICT, "application/octet-stream", 200_000) + b"\xff\xd8" + b"\x00" * 998)
        try:
            status, _, body = read_response(sock)
        except TimeoutError:
            pytest.fail(
                f"no answer {REQUEST_TIMEOUT_S + 3}s after a stalled upload (request timeout {REQUEST_TIMEOUT_S}s)"
            )
        except ConnectionError:
            return  # closing the connection is an acceptable answer too
    assert status in (408, 504)
    error_body(status, body.decode())


def queue_depth(http: httpx.Client) -> int:
    depth: int = http.get("/models").json()["models"][0]["batching"]["queue_depth"]
    return depth


def test_stalled_uploads_do_not_lock_out_other_clients(server, http, good_photo):
    queue_size = http.get("/models").json()["models"][0]["batching"]["max_queue_size"]
    with contextlib.ExitStack() as stack:
        for _ in range(queue_size):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", server.port), timeout=10))
            sock.sendall(request_head(PREDICT, "application/octet-stream", 200_000) + good_photo[:1000])
        # Let the server read every stalled request's head and admit it (today it admits before the
        # body; a server that admits after the body never gets there, which is fine).
        deadline = time.monotonic() + 2
        while queue_depth(http) < queue_size and time.monotonic() < deadline:
            time.sleep(0.05)
        # Give the server the request timeout (and some) to shed the stalled uploads.
        assert_serving(http, good_photo, within_s=REQUEST_TIMEOUT_S + 3)
    assert_serving(http, good_photo)


TRAVERSALS = [
    "/..%2F..%2Fetc%2Fpasswd/predict",
    "/..%2f..%2f..%2f..%2fetc%2fpasswd/predict",
    "/%2e%2e/predict",
    "/%2E%2E%2F%2E%2E/predict",
    "/predictions/..%2F..%2Fetc%2Fpasswd",
    "/predictions/%2e%2e",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_a_model_name_with_path_traversal_is_json_404(server, good_photo, path):
    # A raw socket, so no client library normalises the path before the server sees it.
    body = part("data", good_photo) + b"--B--\r\n"
    status, _, response = raw_exchange(server, request_head(path, "multipart/form-data; boundary=B", len(body)), body)
    assert status == 404
    text = response.decode()
    assert error_body(404, text)["type"] in ("NotFound", "ModelNotFound")
    assert "root:" not in text


def test_path_traversal_never_touches_the_filesystem(hostile_weights, good_photo):
    """In-process, with an audit hook: no open(), listdir, scandir... while the traversals are served."""
    seen: list[tuple[str, str]] = []
    recording = False

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if recording and (event == "open" or event.startswith(("os.", "shutil.", "glob.", "pathlib."))):
            seen.append((event, repr(args)[:200]))

    sys.addaudithook(audit)  # hooks cannot be removed; this one records only while `recording`
    settings = Settings(models=(MODEL,), weights_dir=hostile_weights, device="cpu")
    upload = {"files": [("data", ("kitten.jpg", good_photo, "image/jpeg"))]}
    with TestClient(create_app(settings)) as client:
        client.post("/resnet19/predict", **upload)  # warm: lazy imports on the first 404 are not the point
        recording = True
        (REPO / "pyproject.toml").read_bytes()  # the control: the hook does see an open()
        assert any(event == "open" for event, _ in seen), "the audit hook records nothing"
        seen.clear()
        for path in TRAVERSALS:
            assert client.post(path, **upload).status_code == 404
        recording = False
    assert seen == []


# --- nothing leaks ----------------------------------------------------------------------------------


def request_level_attacks(server: LiveServer, http: httpx.Client) -> None:
    """The attacks that could each leave something behind: parts, headers, sockets, a half body."""
    head = request_head(PREDICT, "multipart/form-data; boundary=B", len(TEN_THOUSAND_PARTS))
    assert raw_exchange(server, head, TINY_PART * 200)[0] == 400
    big_name = part("data", b"\xff\xd8", filename=b"A" * (1 << 20)) + b"--B--\r\n"
    assert http.post(PREDICT, content=big_name, headers={"content-type": "multipart/form-data; boundary=B"}).is_error
    assert raw_exchange(server, request_head(PREDICT, "application/octet-stream", 50 << 20), b"\x00" * 1000)[0] == 413
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request_head(PREDICT, "application/octet-stream", 200_000) + b"\x00" * 1000)


def one_pass(server: LiveServer, http: httpx.Client) -> None:
    for item in corpus():
        if item.known_bug:
            continue
        for transport in TRANSPORTS:
            response, elapsed = post_item(http, item, transport)
            check_outcome(item, transport, response.status_code, response.text, elapsed)
    request_level_attacks(server, http)


def settle(measure: Callable[[], int], limit: int, within_s: float = 5.0) -> int:
    """The measurement once it is at or below `limit`, or its last value after `within_s`: sockets
    that the client closed are closed by the server when its event loop gets to them."""
    deadline = time.monotonic() + within_s
    value = measure()
    while value > limit and time.monotonic() < deadline:
        time.sleep(0.05)
        value = measure()
    return value


MEASURED_PASSES = 2


def test_nothing_leaks_and_the_server_still_serves(server, http, good_photo):
    assert_serving(http, good_photo)
    threads_before, fds_before = server.threads(), server.open_fds()
    one_pass(server, http)  # warm-up: decode threads, malloc arenas, torch's allocator caches fill here
    assert_serving(http, good_photo)
    rss_warm = server.rss_bytes()
    for _ in range(MEASURED_PASSES):
        one_pass(server, http)
    assert_serving(http, good_photo)
    rss_after = server.rss_bytes()

    # Threads: the decode pool may still be growing to its size after the first request.
    threads_after = settle(server.threads, threads_before + DECODE_WORKERS)
    assert threads_after <= threads_before + DECODE_WORKERS, (threads_before, threads_after)
    fds_after = settle(server.open_fds, fds_before + 5)
    assert fds_after <= fds_before + 5, (fds_before, fds_after)
    # RSS after the warm-up pass wanders by a few MB (glibc's per-thread arenas, fragmentation from
    # the large temporary buffers such as the 12 MB the 2000x2000 zlib bomb decodes to): measured on
    # this box, +2.5 to +3 MB over three passes on a ~860 MB process (torch, the model). A leak is
    # far bigger: each pass decodes ~40 images whose tensors (150 KB uint8, 600 KB float32 each)
    # would pile up, and the bomb alone would add 12 MB a pass. 5% of ~860 MB is ~43 MB, the bound
    # that applies here; the 30 MB floor is for a leaner process. (A leak of only the upload bytes,
    # ~0.7 MB a pass, is below what RSS can show.)
    allowed = max(0.05 * rss_warm, 30 * 1024 * 1024)
    growth = rss_after - rss_warm
    assert growth < allowed, (
        f"RSS grew {growth / 2**20:.1f} MiB over {MEASURED_PASSES} passes (allowed {allowed / 2**20:.1f} MiB)"
    )


def test_the_server_logged_no_unhandled_error(server):
    log = server.log()
    assert "unhandled error" not in log
    assert "Traceback" not in log
