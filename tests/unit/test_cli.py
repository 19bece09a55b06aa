"""The `resnet-serve` command line: weights commands, flag validation, `python -m service`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.cli import SERVE_FLAGS, SERVE_SWITCHES, main
from service.config import Settings
from tests.conftest import REPO
from tests.unit.conftest import OneFile


def test_weights_random_then_list(tmp_path, capsys):
    assert main(["weights", "random", "resnet18", "--seed", "4", "--dir", str(tmp_path)]) == 0
    assert "resnet18v1: wrote random-init weights (seed 4)" in capsys.readouterr().out
    assert main(["weights", "list", "--dir", str(tmp_path), "--verify"]) == 0
    listing = capsys.readouterr().out.splitlines()
    r18 = next(line for line in listing if line.startswith("resnet18v1"))
    assert "random-init seed 4" in r18
    assert "verified sha256" in r18
    assert next(line for line in listing if line.startswith("resnet50v1")).endswith("missing")


def test_weights_list_flags_a_corrupt_official_file(tmp_path, capsys):
    (tmp_path / "resnet34-b627a593.pth").write_bytes(b"garbage")
    assert main(["weights", "list", "--dir", str(tmp_path), "--verify"]) == 0
    assert "CORRUPT" in capsys.readouterr().out


def test_weights_fetch_rejects_a_corrupted_download(tmp_path, capsys, file_server):
    OneFile.body = b"a corrupted download"
    base = f"http://127.0.0.1:{file_server.server_address[1]}/"
    code = main(["weights", "fetch", "resnet18v1", "--dir", str(tmp_path), "--base-url", base])
    assert code == 1
    assert "does not start with f37072fd" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_names_are_refused(tmp_path, capsys):
    assert main(["weights", "random", "alexnet", "--dir", str(tmp_path)]) == 2
    assert "unknown model 'alexnet'" in capsys.readouterr().err


def test_serve_rejects_bad_settings_before_starting(capsys):
    assert main(["serve", "--max-batch-size", "0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    assert main(["serve", "--models", "resnet18v1,vgg16"]) == 2
    assert "unknown model 'vgg16'" in capsys.readouterr().err


def test_every_serve_flag_is_a_setting_and_every_setting_a_flag():
    fields = set(Settings.model_fields)
    flags = [(flag, field) for flag, field, _, _ in SERVE_FLAGS] + [(flag, field) for flag, field, _ in SERVE_SWITCHES]
    for flag, field in flags:
        assert field in fields, flag
        assert flag == "--" + field.replace("_", "-")
    assert {field for _, field in flags} == fields


@pytest.mark.parametrize("entry", [[sys.executable, "-m", "service"], [str(REPO / ".venv/bin/resnet-serve")]])
def test_module_and_console_script_behave_the_same(entry):
    if not (REPO / ".venv/bin/resnet-serve").exists() and "resnet-serve" in entry[0]:
        pytest.skip("console script not installed in .venv")
    result = subprocess.run([*entry, "weights", "--help"], capture_output=True, text=True, check=False, cwd=REPO)
    assert result.returncode == 0
    assert "random" in result.stdout
    assert "fetch" in result.stdout


def test_weights_ensure_keeps_what_is_there_and_fills_what_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RESNET_SERVE_WEIGHTS_BASE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("RESNET_SERVE_RANDOM_SEED", "5")
    assert main(["weights", "random", "resnet18v1", "--seed", "1", "--dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["weights", "ensure", "resnet18v1", "resnet34v1", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "resnet18v1.safetensors (random-init seed 1)" in out
    assert "resnet34v1.safetensors (random-init seed 5)" in out
    assert main(["weights", "ensure", "resnet50v1", "--dir", str(tmp_path), "--missing-weights", "fetch"]) == 1
    assert "could not fetch the weights of resnet50v1" in capsys.readouterr().err
