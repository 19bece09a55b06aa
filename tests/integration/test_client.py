"""`resnet-serve predict` against a live server with seeded random weights: the table, `--json`, the
exit codes, `RESNET_SERVE_URL`. One subprocess run proves the console path (and that it starts
without torch); the rest call `main` in-process to stay fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.cli import main
from service.client import URL_ENV, ExitCode
from tests.conftest import KITTEN, KITTEN_SMALL, REPO
from tests.integration.live import LiveServer, free_port, running

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with running(weights, tmp_path_factory.mktemp("client") / "server.log") as live:
        yield live


@pytest.fixture
def dead_url() -> str:
    """A loopback port that nothing listens on: connection refused."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(autouse=True)
def _no_url_from_the_environment(monkeypatch):
    monkeypatch.delenv(URL_ENV, raising=False)


def api_answer(url: str, *images: Path) -> httpx.Response:
    files = [("data", (image.name, image.read_bytes())) for image in images]
    response = httpx.post(f"{url}/resnet18v1/predict", files=files, timeout=60)
    assert response.status_code == 200, response.text
    return response


def table_blocks(out: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """The printed table as (image, [(class, probability as printed)]) per block, in order."""
    header, *rows = out.rstrip("\n").split("\n")
    class_column = header.index("class")
    blocks: list[tuple[str, list[tuple[str, str]]]] = []
    for row in rows:
        if not row:
            continue
        left, probability = row.rsplit(None, 1)
        image, label = left[:class_column].strip(), left[class_column:].strip()
        if image:
            blocks.append((image, []))
        blocks[-1][1].append((label, probability))
    return blocks


def as_printed(classes: list[dict[str, object]]) -> list[tuple[str, str]]:
    return [(str(c["class"]), f"{c['probability']:.4f}") for c in classes]


def test_the_table_shows_the_classes_and_probabilities_the_api_returns(server, capsys):
    expected = api_answer(server.url, KITTEN).json()["prediction"][0]
    assert main(["predict", str(KITTEN), "--url", server.url]) == ExitCode.OK
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.split()[:3] == ["image", "class", "probability"]
    assert table_blocks(captured.out) == [(str(KITTEN), as_printed(expected))]
    assert len(expected) == 5  # the server's default topk, as nothing was asked


def test_json_prints_the_servers_json_as_it_came(server, capsys):
    expected = api_answer(server.url, KITTEN)
    assert main(["predict", str(KITTEN), "--url", server.url, "--json"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert out == expected.text + "\n"
    assert json.loads(out) == expected.json()


def test_two_images_give_two_blocks_in_order_from_one_request(server, capsys):
    expected = api_answer(server.url, KITTEN, KITTEN_SMALL).json()["prediction"]
    assert expected[0] != expected[1]  # else the order could not show
    assert main(["predict", str(KITTEN), str(KITTEN_SMALL), "--url", server.url, "--topk", "3"]) == ExitCode.OK
    blocks = table_blocks(capsys.readouterr().out)
    assert blocks == [(str(KITTEN), as_printed(expected[0][:3])), (str(KITTEN_SMALL), as_printed(expected[1][:3]))]
    # Reversed on the command line, reversed in the table: answers map to images by position.
    assert main(["predict", str(KITTEN_SMALL), str(KITTEN), "--url", server.url, "--topk", "3"]) == ExitCode.OK
    assert table_blocks(capsys.readouterr().out) == blocks[::-1]


def test_an_unknown_model_exits_1_with_the_servers_message(server, capsys):
    assert main(["predict", str(KITTEN), "--url", server.url, "--model", "alexnet"]) == ExitCode.HTTP_ERROR == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("resnet-serve: 404 ModelNotFound: model 'alexnet' is not served here")


def test_a_broken_image_exits_1_and_the_message_names_the_file(server, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(KITTEN.read_bytes()[:20_000])  # a truncated JPEG: 400 from our server
    assert main(["predict", str(KITTEN), str(broken), "--url", server.url]) == ExitCode.HTTP_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"resnet-serve: 400 InvalidInput: {broken} (image 2 of 2): "), captured.err
    assert "truncated" in captured.err


def test_a_server_that_is_not_listening_exits_3(dead_url, capsys):
    assert main(["predict", str(KITTEN), "--url", dead_url]) == ExitCode.UNREACHABLE == 3
    err = capsys.readouterr().err
    assert err.startswith(f"resnet-serve: cannot reach {dead_url}: ")
    assert "refused" in err.lower()


def test_a_missing_local_file_exits_2_before_anything_is_sent(dead_url, tmp_path, capsys):
    missing = tmp_path / "nope.jpg"
    # Against a dead server: exit 2 (not 3) shows the file was checked before any connection.
    assert main(["predict", str(KITTEN), str(missing), "--url", dead_url]) == ExitCode.BAD_INPUT == 2
    assert capsys.readouterr().err == f"resnet-serve: cannot read {missing}: No such file or directory\n"


def test_resnet_serve_url_is_honoured_and_the_flag_wins(server, dead_url, monkeypatch, capsys):
    monkeypatch.setenv(URL_ENV, server.url)
    assert main(["predict", str(KITTEN)]) == ExitCode.OK
    assert table_blocks(capsys.readouterr().out)[0][0] == str(KITTEN)
    assert main(["predict", str(KITTEN), "--url", dead_url]) == ExitCode.UNREACHABLE
    monkeypatch.setenv(URL_ENV, dead_url)
    assert main(["predict", str(KITTEN), "--url", server.url]) == ExitCode.OK


def test_the_console_command_reads_the_environment_and_starts_without_torch(server):
    env = {**os.environ, URL_ENV: server.url, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "service", "predict", str(KITTEN), "--topk", "2"],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [image for image, _ in table_blocks(result.stdout)] == [str(KITTEN)]
    assert len(table_blocks(result.stdout)[0][1]) == 2
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "httpx" in imported  # the check sees the client's imports
    assert not {name for name in imported if name.split(".")[0] in {"torch", "torchvision", "numpy", "PIL"}}
