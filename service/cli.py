"""The `resnet-serve` command: `serve`, `weights random|fetch|ensure|list` and `predict`. Parsing and dispatch only.

The flags, their help and the `RESNET_SERVE_*` environment variables of `serve` are generated from the
fields of `service.config.Settings` by pydantic-settings' CLI support (a flag wins over the
environment); the server itself is service/server.py, the `predict` client service/client.py.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    CliApp,
    CliPositionalArg,
    CliSubCommand,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from service.config import MissingWeightsPolicy, Settings

PROG = "resnet-serve"


class WeightsRandom(BaseModel):
    """Write seeded random-init checkpoints (tests, benchmarks)."""

    names: CliPositionalArg[list[str]]
    seed: Annotated[int, Field(description="seed of the random init")] = 0
    dir: Annotated[Path, Field(description="where to write them")] = Path("weights")


class WeightsFetch(BaseModel):
    """Download official torchvision checkpoints (hash-checked)."""

    names: CliPositionalArg[list[str]]
    dir: Annotated[Path, Field(description="where to write them")] = Path("weights")
    base_url: Annotated[str | None, Field(description="a mirror of download.pytorch.org/models/")] = None


class WeightsEnsure(BaseModel):
    """Make sure each model has a weights file: keep it, else fetch, else random (per --missing-weights).
    Reads the serve settings (RESNET_SERVE_* environment) for the models, directory, seed and mirror;
    what is given here wins. Used by docker-compose's weights-init service."""

    names: Annotated[
        CliPositionalArg[list[str]], Field(description="models (default: RESNET_SERVE_MODELS or resnet18v1)")
    ] = []
    dir: Annotated[Path | None, Field(description="weights directory (default: RESNET_SERVE_WEIGHTS_DIR)")] = None
    missing_weights: Annotated[
        MissingWeightsPolicy | None, Field(description="fetch, random or fetch-or-random (default: fetch-or-random)")
    ] = None


class WeightsList(BaseModel):
    """What weights are present, verified or not."""

    dir: Annotated[Path, Field(description="the weights directory")] = Path("weights")
    verify: Annotated[bool, Field(description="hash every file (slow for big models)")] = False


class Weights(BaseModel):
    """Manage weights files."""

    random: CliSubCommand[WeightsRandom] = Field(description="write seeded random-init checkpoints")
    fetch: CliSubCommand[WeightsFetch] = Field(description="download official checkpoints (hash-checked)")
    ensure: CliSubCommand[WeightsEnsure] = Field(description="keep, else fetch, else generate each model's weights")
    list: CliSubCommand[WeightsList] = Field(description="what weights are present, verified or not")


class Predict(BaseModel):
    """Classify images with a running server: any that speaks the MMS route POST {url}/{model}/predict.
    All images go in one request. Exit codes: 0 answered; 1 the server answered an error (its message
    on stderr); 2 bad local input (an unreadable image, a bad flag or URL); 3 no answer (refused, timeout)."""

    images: CliPositionalArg[list[Path]]
    url: Annotated[str | None, Field(description="the server; None: RESNET_SERVE_URL, else http://127.0.0.1:8080")] = (
        None
    )
    model: Annotated[str, Field(description="the model to ask")] = "resnet18v1"
    topk: Annotated[int | None, Field(ge=1, description="classes per image; None: the server's default")] = None
    # Not `json`: that name would shadow BaseModel.json.
    as_json: Annotated[bool, Field(alias="json", description="print the server's JSON as it came")] = False
    timeout_s: Annotated[float, Field(gt=0, description="seconds to wait for the answer")] = 60.0


class ResnetServe(BaseSettings):
    """Serve torchvision ResNets over HTTP, batched."""

    model_config = SettingsConfigDict(
        cli_prog_name=PROG,
        cli_kebab_case=True,  # --max-batch-size
        cli_implicit_flags=True,  # --cuda-graphs / --no-cuda-graphs
        cli_avoid_json=True,
        cli_hide_none_type=True,
        cli_enforce_required=True,
    )

    serve: CliSubCommand[Settings] = Field(description="run the HTTP server")
    weights: CliSubCommand[Weights] = Field(description="manage weights files")
    predict: CliSubCommand[Predict] = Field(description="classify images with a running server (a client)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The command line only: `serve` reads its RESNET_SERVE_* environment itself (it is Settings).
        return (init_settings,)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        command = CliApp.run(ResnetServe, cli_args=args)
    except ValidationError as exc:
        print(f"{PROG}: invalid setting: {_validation_summary(exc)}", file=sys.stderr)
        return 2
    if command.serve is not None:
        return _serve(command.serve)
    if command.predict is not None:
        return _predict(command.predict)
    weights = command.weights
    if weights is not None and weights.random is not None:
        return _weights_random(weights.random)
    if weights is not None and weights.fetch is not None:
        return _weights_fetch(weights.fetch)
    if weights is not None and weights.ensure is not None:
        return _weights_ensure(weights.ensure)
    if weights is not None and weights.list is not None:
        return _weights_list(weights.list)
    with contextlib.suppress(SystemExit):  # no command: the help of the level that was given
        CliApp.run(ResnetServe, cli_args=[*args, "--help"])
    return 2


def _serve(settings: Settings) -> int:
    from service.errors import StartupError
    from service.models.registry import resolve_specs
    from service.models.runner import pick_device
    from service.server import configure_logging, serve

    try:
        resolve_specs(settings.models)
        # Rules only the device can judge, checked once before anything starts (or any worker).
        settings.resolve(on_gpu=pick_device(settings.device).type == "cuda")
    except ValueError as exc:  # the rules between settings, e.g. graphs on a CPU
        print(f"{PROG}: invalid setting: {exc}", file=sys.stderr)
        return 2
    except (StartupError, RuntimeError) as exc:  # an unknown model, --device cuda without CUDA
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    return serve(settings)


def _predict(args: Predict) -> int:
    # Imported here, as the server's modules are in their commands: the client starts without them.
    from service.client import run

    return run(
        args.images, url=args.url, model=args.model, topk=args.topk, as_json=args.as_json, timeout_s=args.timeout_s
    )


def _weights_random(args: WeightsRandom) -> int:
    from service.models.weights import write_random

    specs = _specs_or_exit(args.names)
    if specs is None:
        return 2
    for spec in specs:
        path = write_random(spec, args.seed, args.dir)
        print(f"{spec.name}: wrote random-init weights (seed {args.seed}) to {path}")
    return 0


def _weights_fetch(args: WeightsFetch) -> int:
    from service.models.catalog import OFFICIAL_BASE_URL
    from service.models.weights import fetch_official

    specs = _specs_or_exit(args.names)
    if specs is None:
        return 2
    failed = 0
    for spec in specs:
        try:
            path = fetch_official(spec, args.dir, base_url=args.base_url or OFFICIAL_BASE_URL)
        except (OSError, ValueError) as exc:
            print(f"{spec.name}: fetch failed: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{spec.name}: {path} (sha256 verified)")
    return 1 if failed else 0


def _weights_ensure(args: WeightsEnsure) -> int:
    from service.errors import StartupError
    from service.models.registry import obtain_weights, resolve_specs
    from service.server import configure_logging

    overrides: dict[str, Any] = {"missing_weights": args.missing_weights or MissingWeightsPolicy.FETCH_OR_RANDOM}
    if args.names:
        overrides["models"] = tuple(args.names)
    if args.dir is not None:
        overrides["weights_dir"] = args.dir
    configure_logging("warning")
    try:
        settings = Settings(**overrides)
        for spec in resolve_specs(settings.models):
            weights = obtain_weights(spec, settings)
            print(f"{spec.name}: {weights.path} ({weights.describe()})", flush=True)
    except ValidationError as exc:
        print(f"{PROG}: invalid setting: {_validation_summary(exc)}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    return 0


def _weights_list(args: WeightsList) -> int:
    from service.errors import StartupError
    from service.models.catalog import CATALOG
    from service.models.weights import find_weights, verify

    for spec in CATALOG.values():
        found = find_weights(spec, args.dir)
        if found is None:
            print(f"{spec.name:18} missing")
            continue
        status = "present"
        if args.verify:
            try:
                status = f"verified sha256 {verify(found)[:12]}"
            except StartupError as exc:
                status = f"CORRUPT: {exc}"
        print(f"{spec.name:18} {found.path.name:40} {found.describe():32} {status}")
    return 0


def _specs_or_exit(names: Sequence[str]) -> list[Any] | None:
    from service.errors import StartupError
    from service.models.registry import resolve_specs

    try:
        return resolve_specs(tuple(names))
    except StartupError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return None


def _validation_summary(exc: ValidationError) -> str:
    """Each error as the flag and environment variable it came from: `--max-batch-size
    (RESNET_SERVE_MAX_BATCH_SIZE): Input should be greater than or equal to 1`."""
    settings_fields = set(Settings.model_fields)
    parts = []
    for error in exc.errors():
        # The location starts with the subcommands (`serve`, `weights ensure`) and may end with an index.
        field = next((part for part in reversed(error["loc"]) if isinstance(part, str)), "")
        if not field:
            parts.append(error["msg"])
            continue
        name = "--" + field.replace("_", "-")
        if field in settings_fields:
            name += f" (RESNET_SERVE_{field.upper()})"
        parts.append(f"{name}: {error['msg']}")
    return "; ".join(parts)
