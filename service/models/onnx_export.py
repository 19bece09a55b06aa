"""Export a model's torch weights to ONNX once, and keep the file, so that a restart loads it instead.

A cached file is named by everything it depends on: the weights' sha256, the variant (fp32, or
int8 with its calibration set), the opset, the exporter (torch's version) and the runtime's version.
Change any of them and the name changes, so a stale file is never picked up. Beside each file a
small JSON record holds that key, the file's own sha256 (checked on every load: a truncated or
altered file is exported again) and the facts /models reports without building the torch model.

Several workers starting at once take a lock per file: one exports, the others wait and load it.
A read-only cache directory that already holds the file works (e.g. baked into an image); one that
lacks it is a startup error naming the directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from service.errors import StartupError
from service.models.runtimes import without_head

logger = logging.getLogger(__name__)

OPSET = 17
# The TorchScript-based exporter: deprecated in favour of torch.export's, but its graph runs faster
# in onnxruntime here and it exports in a second rather than eight (docs/benchmarks.md).
EXPORTER = f"torch {torch.__version__} torchscript"
INPUT_NAME = "data"  # as the ONNX model zoo's ResNets name it
OUTPUT_NAME = "logits"
FEATURES_NAME = "features"  # the pooled features the head reads: what /embed returns


@dataclass(frozen=True)
class ExportKey:
    model: str
    weights_sha256: str
    runtime: str  # the runtime and version that will load the file, e.g. "onnxruntime 1.32.0"
    variant: str = "fp32"
    opset: int = OPSET
    exporter: str = EXPORTER
    outputs: str = f"{OUTPUT_NAME}+{FEATURES_NAME}"

    @property
    def stem(self) -> str:
        exporter = self.exporter.replace(" ", "-")
        runtime = self.runtime.replace(" ", "-")
        outputs = self.outputs.replace("+", "-")
        return (
            f"{self.model}-{self.weights_sha256[:16]}-{self.variant}-{outputs}-opset{self.opset}-{exporter}-{runtime}"
        )

    def derived(self, variant: str) -> ExportKey:
        return dataclasses.replace(self, variant=variant)


@dataclass(frozen=True)
class CachedModel:
    """A cached file whose bytes hashed to `sha256` when it was checked (its bytes are not kept:
    the runtime loads the file itself, and a copy held here would stay resident for nothing)."""

    path: Path
    sha256: str
    num_parameters: int


class _LogitsAndFeatures(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.body = without_head(model)
        head = model.fc
        assert isinstance(head, nn.Module)
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.head(features), features


def export_onnx(module: nn.Module, *, input_size: int, model: str) -> bytes:
    """The module as ONNX bytes: input `data` (N, 3, S, S) float32, outputs `logits` and `features`
    (the pooled features its head `fc` reads), N dynamic."""
    buffer = io.BytesIO()
    sample = torch.zeros(1, 3, input_size, input_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the exporter's own deprecation notice
            torch.onnx.export(
                # eval() on the wrapper too: the exporter restores the mode it found, on the shared layers
                _LogitsAndFeatures(module).eval(),
                (sample,),
                buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects too
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME, FEATURES_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}, FEATURES_NAME: {0: "batch"}},
            )
    except Exception as exc:  # the exporter raises many types; each is a startup error for this model
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise StartupError(
            f"{model}: exporting to ONNX failed ({type(exc).__name__}: {reason}); serve it with --runtime torch"
        ) from None
    return buffer.getvalue()


class ExportCache:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def get_or_create(self, key: ExportKey, create: Callable[[], tuple[bytes, int]]) -> CachedModel:
        """The cached file for `key`, or `create()`'s (bytes, parameter count) written there first."""
        found = self._read(key)
        if found is not None:
            return found
        with self._locked(key):
            found = self._read(key)  # another worker may have written it while this one waited
            if found is not None:
                return found
            data, num_parameters = create()
            return self._write(key, data, num_parameters)

    def _paths(self, key: ExportKey) -> tuple[Path, Path]:
        return self.directory / f"{key.stem}.onnx", self.directory / f"{key.stem}.json"

    def _read(self, key: ExportKey) -> CachedModel | None:
        path, record_path = self._paths(key)
        try:
            record = json.loads(record_path.read_text())
            data = path.read_bytes()
        except (OSError, ValueError):
            return None
        sha256 = hashlib.sha256(data).hexdigest()
        if record.get("key") != asdict(key) or record.get("sha256") != sha256:
            logger.warning("%s: the cached %s does not match its record; exporting again", key.model, path)
            return None
        logger.info("%s: loading the cached %s (sha256 %s)", key.model, path, sha256[:12])
        return CachedModel(path, sha256, int(record["num_parameters"]))

    @contextlib.contextmanager
    def _locked(self, key: ExportKey) -> Iterator[None]:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = (self.directory / f".{key.stem}.lock").open("a")
        except OSError as exc:
            raise self._unwritable(key, exc) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write(self, key: ExportKey, data: bytes, num_parameters: int) -> CachedModel:
        path, record_path = self._paths(key)
        sha256 = hashlib.sha256(data).hexdigest()
        record = {"key": asdict(key), "sha256": sha256, "num_parameters": num_parameters, "bytes": len(data)}
        try:
            # The record goes last: a record present means its file is complete.
            _atomic_write(path, data)
            _atomic_write(record_path, json.dumps(record, indent=2).encode())
        except OSError as exc:
            raise self._unwritable(key, exc) from None
        logger.info("%s: exported to %s (sha256 %s)", key.model, path, sha256[:12])
        return CachedModel(path, sha256, num_parameters)

    def _unwritable(self, key: ExportKey, exc: OSError) -> StartupError:
        return StartupError(
            f"{key.model}: the ONNX cache directory {self.directory} is not writable ({exc.strerror or exc}); "
            "set --onnx-cache-dir to a writable directory, or use --runtime torch"
        )


def _atomic_write(path: Path, data: bytes) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
