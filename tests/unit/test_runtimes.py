"""The runtime layer: ONNX Runtime agrees with torch, exports are cached and checked, errors are one line."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import pytest
import safetensors.torch
import torch
import torchvision

from service import cores
from service.config import Settings
from service.errors import StartupError
from service.imaging import Preprocessing, preprocess
from service.models import onnx_loading
from service.models.catalog import CATALOG
from service.models.onnx_export import ExportCache, ExportKey, export_onnx
from service.models.onnx_runtime import OnnxRuntime
from service.models.registry import load_model
from service.models.runner import ModelRunner
from service.models.torch_runtime import TorchRuntime
from service.models.weights import classify, sha256_of

SPEC = CATALOG["resnet18v1"]
CPU = torch.device("cpu")


def peaked_resnet18(seed: int = 0) -> torch.nn.Module:
    """Random weights whose softmax is far from flat: BN statistics randomised, the head scaled up.
    A flat softmax would let a wrong normalisation or a swapped channel pass a probability check."""
    generator = torch.Generator().manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.normal_(0.0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
    with torch.no_grad():
        model.fc.weight.mul_(40.0)
    return model.eval()


def photo_batch(count: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def write_peaked_weights(directory: Path) -> Path:
    path = directory / "resnet18v1.safetensors"
    safetensors.torch.save_file(peaked_resnet18().state_dict(), str(path))
    return path


def plan(tmp_path: Path, **overrides: Any):
    values: dict[str, Any] = {
        "weights_dir": tmp_path / "weights",
        "device": "cpu",
        "runtime": "onnxruntime",
        "onnx_cache_dir": tmp_path / "cache",
        "max_batch_size": 2,
    }
    return Settings(**(values | overrides)).resolve(on_gpu=False)


@pytest.fixture
def peaked_weights(tmp_path: Path):
    (tmp_path / "weights").mkdir()
    return classify(SPEC, write_peaked_weights(tmp_path / "weights"))


def test_onnxruntime_agrees_with_torch_at_every_batch_size(peaked_weights, tmp_path):
    torch_model = load_model(SPEC, peaked_weights, plan(tmp_path, runtime="torch"), CPU)
    onnx_model = load_model(SPEC, peaked_weights, plan(tmp_path), CPU)
    assert isinstance(torch_model.runner.runtime, TorchRuntime)
    assert isinstance(onnx_model.runner.runtime, OnnxRuntime)
    batch = photo_batch(8)
    for count in (1, 3, 8):
        images = list(batch[:count])
        expected = torch.stack(torch_model.runner.predict(images))  # type: ignore[arg-type]
        got = torch.stack(onnx_model.runner.predict(images))  # type: ignore[arg-type]
        assert expected.max(dim=1).values.mean() > 0.5  # peaked: a wrong transform would show
        assert torch.equal(got.argmax(dim=1), expected.argmax(dim=1))
        # Peaked logits are large (the head is scaled 40x), and float32 convolutions summed in
        # another order (MLAS, oneDNN) differ by ~1e-6 of them: up to a few 1e-5 in a probability
        # near 0.5. The 1e-5 agreement on real photos is tests/http/test_correctness.py's.
        assert (got - expected).abs().max() <= 1e-4
    assert onnx_model.num_parameters == torch_model.num_parameters == 11_689_512


def test_the_export_is_cached_and_a_restart_loads_it_without_exporting_again(peaked_weights, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="service.models"):
        first = load_model(SPEC, peaked_weights, plan(tmp_path), CPU)
    assert caplog.text.count("exporting to ONNX") == 1
    info = first.runner.runtime.info
    assert info.file is not None and info.file.parent == tmp_path / "cache"
    assert peaked_weights.path.name not in info.file.name and sha256_of(peaked_weights.path)[:16] in info.file.name
    assert sha256_of(info.file) == info.file_sha256

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="service.models"):
        second = load_model(SPEC, peaked_weights, plan(tmp_path), CPU)
    assert "exporting to ONNX" not in caplog.text and "loading the cached" in caplog.text
    assert second.runner.runtime.info.file == info.file
    image = list(photo_batch(1))
    assert torch.equal(first.runner.predict(image)[0], second.runner.predict(image)[0])  # type: ignore[arg-type]


_LOAD_AND_LIST_IMPORTS = """
import logging
import sys
from pathlib import Path

import psutil
import torch

from service.config import Settings
from service.models.catalog import CATALOG
from service.models.registry import load_model
from service.models.weights import classify

logging.basicConfig(level=logging.INFO)
spec, root, cache = CATALOG["resnet18v1"], Path(sys.argv[1]), Path(sys.argv[2])
settings = Settings(weights_dir=root, device="cpu", runtime="onnxruntime", onnx_cache_dir=cache)
weights = classify(spec, root / "resnet18v1.safetensors")
model = load_model(spec, weights, settings.resolve(on_gpu=False), torch.device("cpu"))
model.runner.warm_up([1, 2])
print(sorted({name.split(".")[0] for name in sys.modules} & {"torchvision", "sympy", "onnxscript"}))
# The exporting child has exited; multiprocessing's resource tracker (spawned with it) may stay.
children = [" ".join(child.cmdline()) for child in psutil.Process().children()]
print("torch._dynamo" in sys.modules, sum("resource_tracker" not in child for child in children))
"""


@pytest.mark.parametrize("cache", ["empty", "filled"])
def test_the_server_process_never_imports_torchvision_on_onnxruntime(peaked_weights, tmp_path, cache):
    """The export runs in a spawned child and the rest of the path needs no torchvision: importing it
    costs ~165 MiB of RSS for good (its ops import torch._dynamo and sympy), which the server on
    ONNX Runtime would otherwise hold on every start with an empty cache (a pod's emptyDir)."""
    if cache == "filled":
        load_model(SPEC, peaked_weights, plan(tmp_path), CPU)
    arguments = [str(peaked_weights.path.parent), str(tmp_path / "cache")]
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_LIST_IMPORTS, *arguments], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported, dynamo_and_children = done.stdout.strip().splitlines()[-2:]
    assert imported == "[]" and dynamo_and_children == "False 0"
    assert ("exporting to ONNX" in done.stderr) is (cache == "empty")
    assert list((tmp_path / "cache").glob("*.onnx"))


def test_a_damaged_cached_file_is_exported_again(peaked_weights, tmp_path, caplog):
    first = load_model(SPEC, peaked_weights, plan(tmp_path), CPU).runner.runtime.info
    assert first.file is not None
    first.file.write_bytes(first.file.read_bytes()[:1000])  # truncated
    again = load_model(SPEC, peaked_weights, plan(tmp_path), CPU).runner.runtime.info
    assert "does not match its record" in caplog.text
    assert again.file_sha256 == first.file_sha256 and sha256_of(again.file) == first.file_sha256  # type: ignore[arg-type]


def test_the_cache_key_holds_the_weights_opset_exporter_and_runtime(tmp_path):
    cache = ExportCache(tmp_path)
    key = ExportKey("m", "ab" * 32, runtime=f"onnxruntime {onnxruntime.__version__}")
    calls: list[str] = []

    def make(label: str):
        def create() -> tuple[bytes, int]:
            calls.append(label)
            return label.encode(), 1

        return create

    assert cache.get_or_create(key, make("a")).path.read_bytes() == b"a"
    assert cache.get_or_create(key, make("b")).path.read_bytes() == b"a"
    changed_keys = [
        ExportKey("m", "cd" * 32, runtime=key.runtime),
        ExportKey("m", key.weights_sha256, runtime="onnxruntime 0.0.1"),
        ExportKey("m", key.weights_sha256, runtime=key.runtime, opset=18),
        ExportKey("m", key.weights_sha256, runtime=key.runtime, exporter="torch 0.0 torchscript"),
        key.derived("int8-0123456789ab"),
    ]
    for changed in changed_keys:
        assert cache.get_or_create(changed, make(changed.stem)).path.read_bytes() == changed.stem.encode()
    assert calls == ["a"] + [changed.stem for changed in changed_keys]  # each change exported anew, once
    assert len({changed.stem for changed in changed_keys} | {key.stem}) == 6
    record = json.loads((tmp_path / f"{key.stem}.json").read_text())
    assert record["key"]["weights_sha256"] == "ab" * 32 and record["key"]["opset"] == 17


@pytest.fixture
def read_only(monkeypatch):
    """Make a directory read-only. Root ignores permission bits, so as root writes into it are refused
    the way a read-only mount refuses them (EROFS); as anyone else chmod alone does it."""
    made: list[Path] = []

    def apply(directory: Path) -> None:
        made.append(directory)
        for child in directory.iterdir():
            child.chmod(0o444)
        directory.chmod(0o555)
        if os.geteuid() != 0:
            return
        real_mkstemp, real_open = tempfile.mkstemp, Path.open

        def mkstemp(*args: Any, dir: Any = None, **kwargs: Any) -> Any:
            if dir is not None and Path(dir) == directory:
                raise PermissionError(errno.EROFS, "Read-only file system")
            return real_mkstemp(*args, dir=dir, **kwargs)

        def open_(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if self.parent == directory and set(mode) & set("wax+"):
                raise PermissionError(errno.EROFS, "Read-only file system")
            return real_open(self, mode, *args, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(Path, "open", open_)

    yield apply
    for directory in made:
        directory.chmod(0o755)


def test_a_read_only_cache_serves_its_files_and_refuses_to_export_in_one_line(peaked_weights, tmp_path, read_only):
    load_model(SPEC, peaked_weights, plan(tmp_path), CPU)
    cache = tmp_path / "cache"
    other = classify(SPEC, _write_other_weights(tmp_path))
    read_only(cache)
    loaded = load_model(SPEC, peaked_weights, plan(tmp_path), CPU)  # already exported: read-only is fine
    assert loaded.runner.runtime.info.file is not None and loaded.runner.runtime.info.file.parent == cache
    with pytest.raises(StartupError) as raised:
        load_model(SPEC, other, plan(tmp_path), CPU)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("resnet18v1: the ONNX cache directory") and str(cache) in message
    assert "--onnx-cache-dir" in message and "--runtime torch" in message


def test_an_uncreatable_cache_directory_is_one_line_naming_the_setting(peaked_weights, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StartupError) as raised:
        load_model(SPEC, peaked_weights, plan(tmp_path, onnx_cache_dir=blocker / "cache"), CPU)
    message = str(raised.value)
    assert "\n" not in message and "resnet18v1" in message and "--onnx-cache-dir" in message


def test_an_export_failure_is_a_startup_error_naming_the_model():
    class NotExportable(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.fft.fft2(x).abs()  # no ONNX symbolic for complex FFT at opset 17

    with pytest.raises(StartupError) as raised:
        export_onnx(NotExportable(), input_size=8, model="oddnet")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("oddnet: exporting to ONNX failed") and "--runtime torch" in message


def test_onnxruntime_missing_is_a_startup_error_naming_the_model(peaked_weights, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(StartupError) as raised:
        onnx_loading.onnx_runtime("resnet18v1", "ab" * 32, lambda: torch.nn.Identity(), plan(tmp_path), CPU,
                                  Preprocessing())  # fmt: skip
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("resnet18v1: --runtime onnxruntime, but onnxruntime is not installed")


def test_the_default_runtime_is_onnxruntime_on_cpu_and_torch_on_gpu():
    assert Settings().resolve(on_gpu=False).runtime == "onnxruntime"
    assert Settings().resolve(on_gpu=True).runtime == "torch"
    assert Settings(compile=True).resolve(on_gpu=False).runtime == "torch"  # a torch-only flag asks for torch
    with pytest.raises(ValueError, match="--compile is for --runtime torch"):
        Settings(runtime="onnxruntime", compile=True).resolve(on_gpu=False)
    with pytest.raises(ValueError, match="--quantize int8 needs --runtime onnxruntime"):
        Settings(runtime="torch", quantize="int8").resolve(on_gpu=False)
    with pytest.raises(ValueError, match="--calibration-images"):
        Settings(quantize="int8").resolve(on_gpu=False)


def test_a_runner_over_each_runtime_gives_the_same_outputs_for_padded_buckets(peaked_weights, tmp_path):
    """Buckets pad a batch with zero images; the padding must not leak into the real rows."""
    onnx = load_model(SPEC, peaked_weights, plan(tmp_path, batch_buckets="4"), CPU).runner
    exact = load_model(SPEC, peaked_weights, plan(tmp_path), CPU).runner
    assert isinstance(exact, ModelRunner) and onnx.plan.buckets == (4,)
    images = list(photo_batch(3))
    for padded, unpadded in zip(onnx.predict(images), exact.predict(images), strict=True):
        assert (padded - unpadded).abs().max() <= 1e-6  # type: ignore[operator]


def _write_other_weights(tmp_path: Path) -> Path:
    directory = tmp_path / "other"
    directory.mkdir()
    model = peaked_resnet18(seed=1)
    path = directory / "resnet18v1.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    return path


def test_quantize_int8_serves_a_cached_quantised_file_that_mostly_agrees_with_fp32(peaked_weights, tmp_path, photos):
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for name in ("kitten.jpg", "chelsea.jpg", "coffee.jpg", "astronaut.jpg"):
        (calibration / name).write_bytes(photos[name])
    int8_plan = plan(tmp_path, quantize="int8", calibration_images=calibration)
    fp32 = load_model(SPEC, peaked_weights, plan(tmp_path), CPU).runner
    int8 = load_model(SPEC, peaked_weights, int8_plan, CPU).runner
    info = int8.runtime.info
    assert info.quantization == f"int8, calibrated on 4 images of {calibration}"
    assert info.file is not None and "-int8-" in info.file.name and info.file != fp32.runtime.info.file
    operators = {node.op_type for node in onnx.load_model(str(info.file)).graph.node}
    assert "QuantizeLinear" in operators and "DequantizeLinear" in operators
    images = [preprocess(data, Preprocessing(), max_pixels=10**8) for data in photos.values()]
    expected, got = torch.stack(fp32.predict(images)), torch.stack(int8.predict(images))  # type: ignore[arg-type]
    assert not torch.equal(expected, got)  # it really runs the quantised model
    agreeing = int((expected.argmax(dim=1) == got.argmax(dim=1)).sum())
    assert agreeing >= len(images) - 1, (agreeing, len(images))
    again = load_model(SPEC, peaked_weights, int8_plan, CPU).runner.runtime.info
    assert again.file == info.file and again.file_sha256 == info.file_sha256  # cached, not quantised again


def _nice_values() -> dict[int, int]:
    """Each thread of this process and its nice value (field 19 of /proc/self/task/TID/stat)."""
    values = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            values[int(task.name)] = int(fields[16])
    return values


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread priorities are read from Linux's /proc")
def test_the_sessions_threads_yield_to_the_event_loop(peaked_weights, tmp_path):
    """Under overload the event loop must still refuse fast: onnxruntime's intra-op threads run at the
    compute threads' lower priority, and the thread that builds the session is untouched."""
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    before = set(_nice_values())
    loaded = load_model(SPEC, peaked_weights, plan(tmp_path, torch_threads=2), CPU)
    started = {tid: nice for tid, nice in _nice_values().items() if tid not in before}
    assert started, "the session started no thread of its own"
    assert all(nice >= cores.COMPUTE_NICENESS for nice in started.values()), started
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own
    assert loaded.runner.runtime.info.name == "onnxruntime"


async def test_the_decode_and_forward_threads_yield_to_the_event_loop(tmp_path):
    from service.engine.pools import Pools

    pools = Pools(plan(tmp_path, max_batches_in_flight=2))

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    try:
        for pool in (pools.decode, pools.forward, pools.stage):
            assert pool.submit(priority).result() >= cores.COMPUTE_NICENESS
        assert priority() < cores.COMPUTE_NICENESS  # the event loop's thread keeps its own
    finally:
        await pools.close()
