"""Weights files: finding, verifying, loading, writing seeded random ones, and fetching official ones.

Loading never unpickles arbitrary objects: `.pth` goes through `torch.load(weights_only=True)`, and
`.safetensors` holds tensors only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from service.errors import StartupError
from service.models.catalog import ModelSpec, OfficialWeights

logger = logging.getLogger(__name__)

OFFICIAL_BASE_URL = "https://download.pytorch.org/models/"
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
    seed: int | None = None

    def describe(self) -> str:
        if self.origin is Origin.RANDOM_INIT:
            return f"random-init seed {self.seed}"
        if self.official is not None:
            return f"official torchvision {self.official.tag}"
        return "user file"


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
    seed = _random_init_seed(path)
    if seed is not None:
        return WeightsFile(path, Origin.RANDOM_INIT, seed=seed)
    return WeightsFile(path, Origin.USER)


def verify(weights: WeightsFile) -> str:
    """Return the file's sha256; an official file must match the hash prefix in its name."""
    digest = sha256_of(weights.path)
    if weights.official is not None and not digest.startswith(weights.official.sha256_prefix):
        raise StartupError(
            f"{weights.path} is corrupt or not the official checkpoint: its sha256 starts with "
            f"{digest[:8]}, the name says {weights.official.sha256_prefix}. Delete it and run "
            f"`resnet-serve weights fetch` again."
        )
    return digest


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(path, device="cpu")
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise StartupError(f"{path} is not a readable checkpoint ({_first_line(exc)})") from None
    except Exception as exc:  # pickle errors come in many types; weights_only refusals too
        raise StartupError(f"{path} is not a plain-tensor checkpoint ({_first_line(exc)})") from None
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
    """Instantiate the architecture and load the checkpoint strictly into it."""
    state_dict = read_state_dict(weights.path)
    num_classes = num_classes_of(state_dict, weights.path)
    model = spec.builder(weights=None, num_classes=num_classes)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise StartupError(
            f"{weights.path} does not fit the {spec.arch} architecture of {spec.name}: {_first_line(exc)}"
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
    _atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    return path


def _random_init_seed(path: Path) -> int | None:
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError):
        return None
    if metadata.get("origin") != Origin.RANDOM_INIT.value:
        return None
    return int(metadata.get("seed", "0"))


def fetch_official(spec: ModelSpec, directory: Path, *, base_url: str = OFFICIAL_BASE_URL) -> Path:
    official = spec.default_weights
    url = base_url.rstrip("/") + "/" + official.filename
    return download(url, directory / official.filename, sha256_prefix=official.sha256_prefix)


def download(url: str, destination: Path, *, sha256_prefix: str, timeout_s: float = 30.0) -> Path:
    """Stream `url` to `destination` with a progress bar; keep it only if its sha256 matches."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    handle, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name, leave=True) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        actual = digest.hexdigest()
        if not actual.startswith(sha256_prefix):
            raise ValueError(f"download of {url} is corrupt: sha256 {actual[:12]}… does not start with {sha256_prefix}")
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)
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
