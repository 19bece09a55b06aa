"""Weights files: finding, verifying, loading, writing seeded random ones, and fetching official ones.

Loading never unpickles arbitrary objects: `.pth` goes through `torch.load(weights_only=True)`, and
`.safetensors` holds tensors only. A file is read once: the bytes that are hashed are the bytes
that are loaded.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import safetensors.torch
import torch
import torch.hub
from safetensors import SafetensorError, safe_open
from torch import nn

from service.errors import StartupError
from service.models.catalog import OFFICIAL_BASE_URL, ModelSpec, OfficialWeights

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


class Origin(StrEnum):
    OFFICIAL = "official"
    RANDOM_INIT = "random-init"
    USER = "user"


@dataclass(frozen=True)
class WeightsFile:
    path: Path
    origin: Origin
    official: OfficialWeights | None = None
    seed: int | None = None  # random-init only; None when the file's metadata gives no usable seed

    def describe(self) -> str:
        if self.origin is Origin.RANDOM_INIT:
            return f"random-init seed {'unknown' if self.seed is None else self.seed}"
        if self.official is not None:
            return f"official torchvision {self.official.tag}"
        return "user file"


@dataclass(frozen=True)
class VerifiedWeights:
    """A weights file and the sha256 it had when it was verified: what a later load must find again."""

    weights: WeightsFile
    sha256: str


@dataclass(frozen=True)
class Checkpoint:
    """A state dict and the sha256 of the very bytes it was parsed from."""

    state_dict: dict[str, torch.Tensor]
    sha256: str


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def candidate_names(spec: ModelSpec) -> list[str]:
    """File names that hold weights for `spec`, in the order they are preferred."""
    official = sorted(spec.official_weights, key=lambda w: not w.is_default)
    plain = [f"{stem}{ext}" for stem in (spec.name, *spec.aliases) for ext in (".safetensors", ".pth")]
    return [w.filename for w in official] + plain


def find_weights(spec: ModelSpec, weights_dir: Path) -> WeightsFile | None:
    for filename in candidate_names(spec):
        path = weights_dir / filename
        if path.is_file():
            return classify(spec, path)
    return None


def classify(spec: ModelSpec, path: Path) -> WeightsFile:
    official = spec.official_by_filename(path.name)
    if official is not None:
        return WeightsFile(path, Origin.OFFICIAL, official=official)
    is_random_init, seed = _random_init_marking(path)
    if is_random_init:
        return WeightsFile(path, Origin.RANDOM_INIT, seed=seed)
    return WeightsFile(path, Origin.USER)


def verify(weights: WeightsFile) -> str:
    """Return the file's sha256; an official file must match the hash prefix in its name."""
    digest = sha256_of(weights.path)
    _check_official(weights, digest)
    return digest


def load_checkpoint(weights: WeightsFile, *, expected_sha256: str | None = None) -> Checkpoint:
    """Read the file once, hash those bytes and parse the state dict from the same bytes, so that a
    file replaced on disk meanwhile never loads unverified. With `expected_sha256` (from an earlier
    `verify`), bytes that hash differently are refused."""
    data, digest = read_verified(weights, expected_sha256=expected_sha256)
    return Checkpoint(_parse_state_dict(data, weights.path), digest)


def read_verified(weights: WeightsFile, *, expected_sha256: str | None = None) -> tuple[bytes, str]:
    """The file's bytes and their sha256, read once; refused if they are not the expected ones."""
    data = _read(weights.path)
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise StartupError(
            f"{weights.path} changed on disk since the supervisor verified it (sha256 {expected_sha256[:12]} "
            f"then, {digest[:12]} now); restart the server to verify it again"
        )
    _check_official(weights, digest)
    return data, digest


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    return _parse_state_dict(_read(path), path)


def _check_official(weights: WeightsFile, digest: str) -> None:
    if weights.official is not None and not digest.startswith(weights.official.sha256_prefix):
        raise StartupError(
            f"{weights.path} is corrupt or not the official checkpoint: its sha256 starts with "
            f"{digest[:8]}, the name says {weights.official.sha256_prefix}. Delete it and run "
            f"`resnet-serve weights fetch` again."
        )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupError(f"{path} cannot be read ({_first_line(exc)})") from None


def _parse_state_dict(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    from service.models.families.mmpretrain import numpy_pickle_allowed

    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load(data)
        # mmpretrain (mmengine) checkpoints carry numpy scalars and arrays in their `meta`: allow the
        # numpy reconstructors those need, and still no other global.
        with numpy_pickle_allowed():
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise StartupError(f"{path} is not a readable checkpoint ({_first_line(exc)})") from None
    except Exception as exc:  # pickle errors come in many types; weights_only refusals too
        # torch's refusal names the global or type the file asked for after this marker, lines below its first
        _, marker, detail = str(exc).partition("WeightsUnpickler error:")
        reason = detail.strip().split("\n")[0].split(". ")[0][:300] if marker else _first_line(exc)
        raise StartupError(f"{path} is not a plain-tensor checkpoint ({reason})") from None
    return _unwrap_state_dict(loaded, path)


def _unwrap_state_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = loaded.get(key)
            if isinstance(inner, Mapping):
                loaded = inner
                break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise StartupError(f"{path} holds no state dict of tensors")
    # Checkpoints saved from DistributedDataParallel prefix every key with `module.`.
    return {str(k).removeprefix("module."): v for k, v in loaded.items()}


def num_classes_of(state_dict: Mapping[str, torch.Tensor], path: Path) -> int:
    fc = state_dict.get("fc.weight")
    if fc is None or fc.ndim != 2:
        raise StartupError(f"{path} has no `fc.weight` matrix: it is not a ResNet checkpoint")
    return int(fc.shape[0])


def build_model(spec: ModelSpec, weights: WeightsFile) -> nn.Module:
    """Instantiate the architecture and load the checkpoint (hash-checked when official) strictly into it."""
    return instantiate(spec, load_checkpoint(weights).state_dict, weights.path)


def instantiate(spec: ModelSpec, state_dict: Mapping[str, torch.Tensor], path: Path) -> nn.Module:
    """The architecture of `spec`, sized to the checkpoint's classes, with `state_dict` loaded strictly."""
    model = spec.builder(weights=None, num_classes=num_classes_of(state_dict, path))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise StartupError(
            f"{path} does not fit the {spec.arch} architecture of {spec.name}: {_first_line(exc)}"
        ) from None
    return model.eval()


def write_random(spec: ModelSpec, seed: int, directory: Path) -> Path:
    """Write a seeded random-init checkpoint that `serve` loads like any other, marked as such."""
    torch.manual_seed(seed)
    model = spec.builder(weights=None, num_classes=1000)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{spec.name}.safetensors"
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    metadata = {"origin": Origin.RANDOM_INIT.value, "seed": str(seed), "arch": spec.arch}
    _atomic_write(path, lambda tmp: safetensors.torch.save_file(state, tmp, metadata=metadata))
    return path


def _random_init_marking(path: Path) -> tuple[bool, int | None]:
    """Whether the file is marked random-init, and its seed where the metadata gives a usable one."""
    if path.suffix != ".safetensors":
        return False, None
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError):
        return False, None
    if metadata.get("origin") != Origin.RANDOM_INIT.value:
        return False, None
    seed = metadata.get("seed")
    try:
        return True, None if seed is None else int(seed)
    except ValueError:
        # The seed is only a label: the tensors load the same, and the random-init banner warns anyway.
        logger.warning("%s: its random-init seed metadata %r is not an integer; the seed is unknown", path, seed)
        return True, None


def fetch_official(spec: ModelSpec, directory: Path, *, base_url: str = OFFICIAL_BASE_URL) -> Path:
    official = spec.default_weights
    url = base_url.rstrip("/") + "/" + official.filename
    return download(url, directory / official.filename, sha256_prefix=official.sha256_prefix)


def download(url: str, destination: Path, *, sha256_prefix: str) -> Path:
    """Download `url` to `destination` with a progress bar; keep it only if its sha256 matches.

    torch.hub writes a temporary file beside `destination`, moves it into place only once the hash
    matched and removes it otherwise, so `destination` is whole or absent."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s to %s", url, destination)
    try:
        torch.hub.download_url_to_file(url, str(destination), hash_prefix=sha256_prefix, progress=True)
    except RuntimeError as exc:
        if not str(exc).startswith("invalid hash value"):
            raise
        # ValueError, one line: what `weights fetch` and the missing-weights policy report.
        raise ValueError(f"download of {url} is corrupt: its sha256 does not start with {sha256_prefix}") from None
    return destination


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(handle)
    try:
        write(tmp_name)
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
