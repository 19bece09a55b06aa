"""Weights files from the loader's side: the bytes hashed are the bytes loaded, resolved weights are
loaded as verified (once for all workers), odd metadata is no traceback, and fetching is atomic."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torchvision

from service.config import MissingWeightsPolicy, Settings
from service.errors import StartupError
from service.imaging import Preprocessing
from service.models.catalog import CATALOG, OfficialWeights
from service.models.registry import LoadedModel, load_all, load_model, resolve_weights
from service.models.weights import Origin, WeightsFile, download, find_weights, write_random
from tests.unit.conftest import OneFile

SPEC = CATALOG["resnet18v1"]
CPU = torch.device("cpu")


def _settings(weights_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "models": ("resnet18v1",),
        "weights_dir": weights_dir,
        "device": "cpu",
        "runtime": "torch",
    }
    values |= {"max_batch_size": 1, **overrides}  # warm-up at batch 1 only: cheap on a CPU
    return Settings(**values).resolve(on_gpu=False)


def _conv1(model: LoadedModel) -> torch.Tensor:
    return model.runner.runtime.model.state_dict()["conv1.weight"]


def _swap_after_first_open(monkeypatch: pytest.MonkeyPatch, target: Path, replacement: Path) -> list[Path]:
    """Replace `target` on disk with `replacement` right after the first time it is opened for reading:
    that open keeps the old file, any later open (a second read) gets the new one."""
    real_open: Callable[..., Any] = Path.open
    opened: list[Path] = []

    def open_then_swap(self: Path, *args: Any, **kwargs: Any) -> Any:
        handle = real_open(self, *args, **kwargs)
        if self == target and not opened:
            opened.append(self)
            os.replace(replacement, target)
        return handle

    monkeypatch.setattr(Path, "open", open_then_swap)
    return opened


def test_a_file_swapped_after_hashing_loads_the_hashed_bytes(tmp_path, monkeypatch):
    target = write_random(SPEC, 1, tmp_path / "weights")
    hashed = target.read_bytes()
    other = write_random(SPEC, 2, tmp_path / "other")
    weights = find_weights(SPEC, tmp_path / "weights")
    assert weights is not None
    opened = _swap_after_first_open(monkeypatch, target, other)
    model = load_model(SPEC, weights, _settings(tmp_path / "weights"), CPU)
    assert opened and target.read_bytes() != hashed  # the swap happened during the load
    assert model.sha256 == hashlib.sha256(hashed).hexdigest()
    assert torch.equal(_conv1(model), safetensors.torch.load(hashed)["conv1.weight"])


def test_an_official_file_swapped_after_its_hash_check_loads_what_was_checked(tmp_path, monkeypatch):
    genuine = torchvision.models.resnet18().state_dict()
    staging = tmp_path / "staging.pth"
    torch.save(genuine, staging)
    prefix = hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
    official = OfficialWeights("TEST", f"https://example.invalid/resnet18-{prefix}.pth", Preprocessing(), True)
    target = tmp_path / official.filename
    staging.rename(target)
    impostor = tmp_path / "impostor.pth"
    torch.save(torchvision.models.resnet18().state_dict(), impostor)
    _swap_after_first_open(monkeypatch, target, impostor)
    model = load_model(SPEC, WeightsFile(target, Origin.OFFICIAL, official=official), _settings(tmp_path), CPU)
    assert model.sha256.startswith(prefix)
    assert torch.equal(_conv1(model), genuine["conv1.weight"])  # not the unverified impostor's


def test_a_non_integer_seed_is_an_unknown_seed_with_one_warning(tmp_path, caplog):
    state = {k: v.contiguous() for k, v in torchvision.models.resnet18().state_dict().items()}
    path = tmp_path / "resnet18v1.safetensors"
    safetensors.torch.save_file(state, str(path), metadata={"origin": "random-init", "seed": "abc"})
    with caplog.at_level(logging.WARNING, logger="service.models.weights"):
        found = find_weights(SPEC, tmp_path)
    assert found is not None and found.origin is Origin.RANDOM_INIT and found.seed is None
    assert found.describe() == "random-init seed unknown"
    [warning] = caplog.records
    assert str(path) in warning.getMessage() and "'abc'" in warning.getMessage()
    assert "\n" not in warning.getMessage()
    loaded = load_all(_settings(tmp_path), CPU)  # the server's own path loads it
    assert torch.equal(_conv1(loaded["resnet18v1"]), state["conv1.weight"])


def test_resolved_weights_are_obtained_once_and_every_load_uses_them(tmp_path):
    offline = _settings(
        tmp_path,
        missing_weights=MissingWeightsPolicy.FETCH_OR_RANDOM,
        random_seed=3,
        weights_base_url="http://127.0.0.1:9/",
    )
    resolved = resolve_weights(offline)
    assert list(resolved) == ["resnet18v1"]
    written = resolved["resnet18v1"]
    assert written.weights.origin is Origin.RANDOM_INIT and written.weights.seed == 3
    assert written.sha256 == hashlib.sha256(written.weights.path.read_bytes()).hexdigest()
    # A file the finder would now prefer (another process's fetch, say) changes nothing for the
    # workers: they load what was resolved, without looking again.
    (tmp_path / SPEC.default_weights.filename).write_bytes(b"appeared later")
    first, second = load_all(offline, CPU, resolved), load_all(offline, CPU, resolved)
    assert first["resnet18v1"].sha256 == second["resnet18v1"].sha256 == written.sha256
    assert first["resnet18v1"].weights.path == written.weights.path
    assert torch.equal(_conv1(first["resnet18v1"]), _conv1(second["resnet18v1"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["resnet18v1.safetensors", "resnet18-f37072fd.pth"])


def test_a_file_changed_after_resolving_is_refused(tmp_path):
    settings = _settings(tmp_path, missing_weights=MissingWeightsPolicy.RANDOM, random_seed=1)
    resolved = resolve_weights(settings)
    write_random(SPEC, 2, tmp_path)  # the same path, other bytes
    with pytest.raises(StartupError, match="changed on disk since the supervisor verified it") as refused:
        load_all(settings, CPU, resolved)
    assert "\n" not in str(refused.value) and "resnet18v1.safetensors" in str(refused.value)


def test_resolving_refuses_a_corrupt_official_file_before_any_load(tmp_path):
    (tmp_path / SPEC.default_weights.filename).write_bytes(b"garbage")
    with pytest.raises(StartupError, match="name says f37072fd"):
        resolve_weights(_settings(tmp_path))


def test_a_failed_download_keeps_the_file_that_was_there(tmp_path, file_server):
    target = tmp_path / "x.pth"
    target.write_bytes(b"the good old file")
    OneFile.body = b"something else"
    url = f"http://127.0.0.1:{file_server.server_address[1]}/x.pth"
    with pytest.raises(ValueError, match="does not start with 00000000"):
        download(url, target, sha256_prefix="00000000")
    assert target.read_bytes() == b"the good old file"
    assert [p.name for p in tmp_path.iterdir()] == ["x.pth"]
