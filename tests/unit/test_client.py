"""`resnet-serve predict` against a stand-in server (any server speaking the MMS route, a proxy's
HTML error), and the wall that keeps the client light. The live-server tests are
tests/integration/test_client.py."""

from __future__ import annotations

import email.parser
import email.policy
import http.server
import json
import threading
from collections.abc import Iterator

import pytest

from service.cli import main
from service.client import URL_ENV, ExitCode
from tests.conftest import KITTEN, KITTEN_SMALL
from tests.unit.test_architecture import SERVICE, roots


class Canned(http.server.BaseHTTPRequestHandler):
    """Answers every POST with `status`, `body` and `headers`; keeps what it was sent."""

    status = 200
    body = b""
    headers_out: dict[str, str] = {}
    received: list[tuple[str, str, bytes]] = []

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        Canned.received.append((self.path, self.headers["Content-Type"], self.rfile.read(length)))
        self.send_response(self.status)
        for name, value in {"Content-Length": str(len(self.body)), **self.headers_out}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def canned(monkeypatch) -> Iterator[str]:
    monkeypatch.delenv(URL_ENV, raising=False)
    Canned.status, Canned.body, Canned.headers_out, Canned.received = 200, b"", {}, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def answer(*probabilities: float) -> bytes:
    classes = [[{"class": f"class {p}", "probability": p}] for p in probabilities]
    return json.dumps({"prediction": classes}).encode()


def test_all_images_go_in_one_request_as_data_parts(canned, capsys):
    Canned.body = answer(0.5, 0.25)
    assert main(["predict", str(KITTEN), str(KITTEN_SMALL), "--url", canned, "--model", "my model", "--topk", "1"]) == 0
    [(path, content_type, body)] = Canned.received
    assert path == "/my%20model/predict?topk=1"
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    parts = list(message.iter_parts())
    assert [part.get_param("name", header="content-disposition") for part in parts] == ["data", "data"]
    assert [part.get_filename() for part in parts] == ["kitten.jpg", "kitten_small.jpg"]
    assert [part.get_payload(decode=True) for part in parts] == [KITTEN.read_bytes(), KITTEN_SMALL.read_bytes()]
    assert "class 0.5" in capsys.readouterr().out


def test_the_table_is_aligned_with_one_block_per_image(canned, capsys):
    Canned.body = json.dumps(
        {
            "prediction": [
                [{"class": "a long class name", "probability": 0.98765}, {"class": "b", "probability": 0.0123}],
                [{"class": "c", "probability": 1.0}],
            ]
        }
    ).encode()
    assert main(["predict", str(KITTEN), str(KITTEN_SMALL), "--url", canned]) == 0
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert lines[1] == lines[4] == ""  # a blank line opens each block
    rows = [lines[0], lines[2], lines[3], lines[5]]
    assert {len(row) for row in rows} == {len(lines[0])}  # right-aligned probabilities end together
    assert [row.split()[-1] for row in rows] == ["probability", "0.9877", "0.0123", "1.0000"]
    assert lines[2].startswith(str(KITTEN)) and lines[5].startswith(str(KITTEN_SMALL))
    assert lines[3].startswith(" ")  # the image is named once per block
    column = lines[0].index("class")  # each class starts under the header, whatever the paths hold
    assert [lines[i][column:].split("  ")[0] for i in (2, 3, 5)] == ["a long class name", "b", "c"]
    assert all(lines[i][column - 2 : column] == "  " for i in (2, 3, 5))


def test_a_non_json_error_prints_the_status_and_a_short_excerpt(canned, capsys):
    Canned.status, Canned.body = 502, b"<html><body>" + b"upstream down " * 100 + b"</body></html>"
    assert main(["predict", str(KITTEN), "--url", canned]) == ExitCode.HTTP_ERROR
    err = capsys.readouterr().err
    assert err.startswith("resnet-serve: HTTP 502 Bad Gateway: <html><body>upstream down")
    assert len(err) < 300


def test_a_429_says_when_to_come_back(canned, capsys):
    Canned.status, Canned.headers_out = 429, {"Retry-After": "2"}
    Canned.body = b'{"code": 429, "type": "QueueFull", "message": "the queue of resnet18v1 is full"}'
    assert main(["predict", str(KITTEN), "--url", canned]) == ExitCode.HTTP_ERROR
    assert capsys.readouterr().err == (
        "resnet-serve: 429 QueueFull: the queue of resnet18v1 is full (Retry-After: 2)\n"
    )


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"[1, 2]", "not an MMS 0.4 prediction body"),
        (b'{"prediction": [[{"label": "x"}]]}', "not an MMS 0.4 prediction body"),
        (answer(0.5), "sent 2 images but the server answered for 1"),
    ],
)
def test_an_answer_in_another_shape_is_an_error_not_a_traceback(canned, capsys, body, says):
    Canned.body = body
    assert main(["predict", str(KITTEN), str(KITTEN_SMALL), "--url", canned]) == ExitCode.HTTP_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    assert says in captured.err


def test_bad_local_input_exits_2(capsys):
    assert main(["predict", str(KITTEN), "--url", "127.0.0.1:8080"]) == ExitCode.BAD_INPUT
    assert "invalid --url '127.0.0.1:8080'" in capsys.readouterr().err
    assert main(["predict", str(KITTEN), "--topk", "0"]) == ExitCode.BAD_INPUT
    assert capsys.readouterr().err.startswith("resnet-serve: invalid setting: --topk: ")


def test_the_client_imports_no_torch_and_no_server_code():
    """`resnet-serve predict` must start fast and work without the server: httpx and the standard library."""
    client = SERVICE / "client.py"
    assert "httpx" in roots(client)
    assert not roots(client) & {"torch", "torchvision", "numpy", "PIL", "fastapi", "starlette", "uvicorn", "service"}
