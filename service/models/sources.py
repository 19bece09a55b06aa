"""What `--models` names: catalog models (`resnet50v1`) and files (`NAME=PATH[#preset]`), as
Model Server's `--models resnet18v1=<file>` syntax has it.

A file's name goes into the routes and the metrics like a catalog name, so it must be URL-safe and
must not shadow a catalog model or alias: `resnet18=my.pth` would make `resnet18` mean two models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from service.errors import StartupError
from service.models.catalog import ModelSpec, find_spec, known_names
from service.models.families.presets import PRESETS

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".onnx")


@dataclass(frozen=True)
class FileModel:
    """A model served from a file given on the command line, in its own family's format."""

    name: str
    path: Path
    preset: str | None = None  # a preprocessing preset (families/presets.py); None: guessed

    @property
    def aliases(self) -> tuple[str, ...]:
        return ()


ModelRequest = ModelSpec | FileModel


def parse_models(entries: tuple[str, ...]) -> list[ModelRequest]:
    """The models `--models` asks for, in order, each once; one line per mistake. A catalog model
    named twice (or by an alias too) loads once, as before files could be named."""
    requests: list[ModelRequest] = []
    names: set[str] = set()
    for entry in entries:
        request = _parse_one(entry)
        if request in requests and isinstance(request, ModelSpec):
            continue  # `resnet18,resnet18v1`: one catalog model asked for twice is loaded once
        if request.name in names:
            raise StartupError(f"--models names {request.name!r} twice; give each model one name")
        names.add(request.name)
        requests.append(request)
    return requests


def _parse_one(entry: str) -> ModelRequest:
    if "=" not in entry:
        spec = find_spec(entry)
        if spec is None:
            raise StartupError(
                f"unknown model {entry!r}; known models: {', '.join(known_names())}, or serve a file as NAME=PATH"
            )
        return spec
    name, _, target = entry.partition("=")
    name = name.strip()
    path_text, _, preset = target.strip().partition("#")
    if not _NAME.match(name):
        raise StartupError(
            f"--models {entry!r}: the name {name!r} must be 1-64 letters, digits, '_', '.' or '-' (it goes in URLs)"
        )
    clash = find_spec(name)
    if clash is not None:
        raise StartupError(
            f"--models {entry!r}: {name!r} is already the catalog model {clash.name}"
            f"{' (an alias)' if clash.name != name else ''}; give the file another name"
        )
    if not path_text:
        raise StartupError(f"--models {entry!r}: no file after '='; write NAME=PATH")
    path = Path(path_text).expanduser()
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise StartupError(
            f"--models {entry!r}: {path.name} is not a model file this server reads ({', '.join(FILE_SUFFIXES)})"
        )
    if preset and preset not in PRESETS:
        raise StartupError(f"--models {entry!r}: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return FileModel(name, path, preset or None)


def catalog_specs(requests: list[ModelRequest]) -> list[ModelSpec]:
    return [request for request in requests if isinstance(request, ModelSpec)]


def configured_names(entries: tuple[str, ...]) -> dict[str, str]:
    """Every name the configured models answer to (aliases included) → the canonical name; empty
    for a configuration that does not parse (startup reports that)."""
    try:
        requests = parse_models(entries)
    except StartupError:
        return {}
    return {alias: request.name for request in requests for alias in (request.name, *request.aliases)}
