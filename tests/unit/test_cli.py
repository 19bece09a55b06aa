"""The `resnet-serve` command line: weights commands, flag validation, `python -m service`."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from service import cli
from service.cli import main
from service.config import MissingWeightsPolicy, Settings
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
    err = capsys.readouterr().err
    assert err.startswith("resnet-serve: invalid setting: --max-batch-size (RESNET_SERVE_MAX_BATCH_SIZE): ")
    assert err.count("\n") == 1, err
    assert main(["serve", "--models", "resnet18v1,vgg16"]) == 2
    assert "unknown model 'vgg16'" in capsys.readouterr().err


def test_a_bad_value_from_the_environment_is_one_line_too(capsys, monkeypatch):
    monkeypatch.setenv("RESNET_SERVE_SHUTDOWN_GRACE_S", "soon")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resnet-serve: invalid setting: --shutdown-grace-s (RESNET_SERVE_SHUTDOWN_GRACE_S): ")
    assert err.count("\n") == 1, err


def test_a_request_bigger_than_the_queue_is_refused_at_startup(tmp_path):
    """Two settings that cannot both hold: one line naming both, exit 2, before any model loads."""
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--weights-dir", str(tmp_path), "--port", "0",
         "--max-queue-size", "8", "--max-images-per-request", "64"],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    line = result.stderr.strip()
    assert line.startswith("resnet-serve: invalid setting: --max-images-per-request (64) is larger than")
    assert "--max-queue-size (8)" in line
    assert "raise --max-queue-size or lower --max-images-per-request" in line


def test_an_unwritable_onnx_cache_directory_stops_the_server_with_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--weights-dir", str(tmp_path / "weights"), "--port", "0",
         "--missing-weights", "random", "--runtime", "onnxruntime", "--onnx-cache-dir", str(blocker / "cache")],
        capture_output=True, text=True, timeout=180, check=False, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"resnet-serve: startup failed: resnet18v1: the ONNX cache directory {blocker / 'cache'}")
    assert last.endswith("set --onnx-cache-dir to a writable directory, or use --runtime torch")


@pytest.fixture
def served(monkeypatch) -> list[Settings]:
    """The settings `serve` would run with, instead of running it."""
    seen: list[Settings] = []

    def capture(settings: Settings) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(cli, "_serve", capture)
    return seen


def test_the_flags_of_the_scripts_and_compose_files_still_parse(served, tmp_path):
    argv = [
        "serve", "--models", "resnet18v1,resnet50v1", "--weights-dir", str(tmp_path), "--missing-weights",
        "fetch-or-random", "--batch-buckets", "1,2,4,8", "--no-cuda-graphs", "--no-channels-last", "--compile",
        "--max-delay-ms", "0", "--shutdown-grace-s", "0.5", "--workers", "2", "--port", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    assert main(["serve", "--batch-buckets", "off", "--cuda-graphs", "--access-log"]) == 0
    assert main(["serve", "--batch-buckets", "auto"]) == 0
    first, second, third = served
    assert first.models == ("resnet18v1", "resnet50v1")
    assert first.weights_dir == tmp_path
    assert first.missing_weights is MissingWeightsPolicy.FETCH_OR_RANDOM
    assert (first.batch_buckets, first.cuda_graphs, first.channels_last, first.compile) == (
        (1, 2, 4, 8),
        False,
        False,
        True,
    )
    assert (first.max_delay_ms, first.shutdown_grace_s, first.workers, first.port) == (0, 0.5, 2, 0)
    assert (second.batch_buckets, second.cuda_graphs, second.access_log) == ((), True, True)
    assert third.batch_buckets is None


def test_a_flag_wins_over_the_environment_and_the_environment_over_defaults(served, monkeypatch):
    monkeypatch.setenv("RESNET_SERVE_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("RESNET_SERVE_CHANNELS_LAST", "false")
    monkeypatch.setenv("RESNET_SERVE_MODELS", "resnet34v1")
    assert main(["serve", "--max-batch-size", "5", "--channels-last"]) == 0
    assert main(["serve"]) == 0
    flagged, from_env = served
    assert (flagged.max_batch_size, flagged.channels_last, flagged.models) == (5, True, ("resnet34v1",))
    assert (from_env.max_batch_size, from_env.channels_last) == (3, False)


def test_every_setting_is_a_serve_flag_with_its_description_as_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert re.search(rf"{flag}\b", help_text), flag
        if field.annotation in (bool, bool | None):
            assert f"--no-{name.replace('_', '-')}" in help_text, flag
        assert field.description, name
        assert " ".join(field.description.split()[:4]) in help_text, name


def test_no_command_prints_the_commands_and_exits_2(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "serve" in out and "weights" in out


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
