"""Startup: find (or fetch, or generate) each model's weights, build it, load it, warm it up.

With several workers, the supervisor calls `resolve_weights` once before they spawn and hands the
result to each worker's `load_all`: one download, and every worker serves the same bytes.
"""

from __future__ import annotations

import functools
import io
import logging
import urllib.error
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from torch import nn

from service.config import MissingWeightsPolicy, RuntimeChoice, ServerPlan
from service.errors import StartupError
from service.imaging import EncodedJpeg, Preprocessing, inspect_jpeg
from service.models.building import make_runner, torch_runtime
from service.models.catalog import ModelSpec
from service.models.child_process import run_in_child
from service.models.families.file_models import load_file_model, user_file
from service.models.labels import find_labels
from service.models.loaded import LoadedModel, ModelCard
from service.models.onnx_loading import onnx_runtime
from service.models.runtimes import Runtime
from service.models.sources import catalog_specs, parse_models
from service.models.weights import (
    Origin,
    VerifiedWeights,
    WeightsFile,
    candidate_names,
    classify,
    fetch_official,
    find_weights,
    instantiate,
    load_checkpoint,
    verify,
    write_random,
)

__all__ = ["LoadedModel", "VerifiedWeights", "load_all", "load_model", "obtain_weights", "resolve_weights"]

logger = logging.getLogger(__name__)


def resolve_specs(names: tuple[str, ...]) -> list[ModelSpec]:
    """The catalog models among `names` (files given as NAME=PATH are checked, then left out)."""
    specs: list[ModelSpec] = []
    for spec in catalog_specs(parse_models(names)):
        if spec not in specs:
            specs.append(spec)
    return specs


class WeightsSettings(Protocol):
    """What obtaining weights reads: `Settings` and the resolved plan both provide it."""

    @property
    def models(self) -> tuple[str, ...]: ...
    @property
    def weights_dir(self) -> Path: ...
    @property
    def missing_weights(self) -> MissingWeightsPolicy: ...
    @property
    def random_seed(self) -> int: ...
    @property
    def weights_base_url(self) -> str: ...


def resolve_weights(settings: WeightsSettings) -> dict[str, VerifiedWeights]:
    """Obtain (find, fetch or write, per `--missing-weights`) and verify every configured model's
    weights once, keyed by model name: what `load_all` then loads without obtaining again."""
    resolved: dict[str, VerifiedWeights] = {}
    for spec in parse_models(settings.models):
        weights = obtain_weights(spec, settings) if isinstance(spec, ModelSpec) else user_file(spec)
        sha256 = verify(weights)
        logger.info("%s: %s (%s), sha256 %s", spec.name, weights.path, weights.describe(), sha256[:12])
        resolved[spec.name] = VerifiedWeights(weights, sha256)
    return resolved


def obtain_weights(spec: ModelSpec, settings: WeightsSettings) -> WeightsFile:
    """The model's weights file, applying the `--missing-weights` policy when there is none."""
    found = find_weights(spec, settings.weights_dir)
    if found is not None:
        return found
    policy = settings.missing_weights
    if policy in (MissingWeightsPolicy.FETCH, MissingWeightsPolicy.FETCH_OR_RANDOM):
        try:
            path = fetch_official(spec, settings.weights_dir, base_url=settings.weights_base_url)
            return classify(spec, path)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            if policy is MissingWeightsPolicy.FETCH:
                raise StartupError(f"could not fetch the weights of {spec.name}: {exc}") from None
            logger.warning("could not fetch the official weights of %s (%s)", spec.name, exc)
    if policy in (MissingWeightsPolicy.RANDOM, MissingWeightsPolicy.FETCH_OR_RANDOM):
        # In a child: building the model imports torchvision, which the server may never need again.
        path = run_in_child(write_random, spec, settings.random_seed, settings.weights_dir)
        return classify(spec, path)
    looked_for = ", ".join(candidate_names(spec))
    raise StartupError(
        f"no weights for {spec.name} in {settings.weights_dir}/ (looked for {looked_for}); "
        f"get them with `resnet-serve weights fetch {spec.name}`, or for testing "
        f"`resnet-serve weights random {spec.name}`"
    )


def load_model(
    spec: ModelSpec,
    weights: WeightsFile,
    settings: ServerPlan,
    device: torch.device,
    *,
    expected_sha256: str | None = None,
) -> LoadedModel:
    """Build the model's runtime from the file's bytes; with `expected_sha256`, only from those bytes."""
    preprocessing = weights.official.preprocessing if weights.official else Preprocessing()
    runtime: Runtime
    if settings.runtime is RuntimeChoice.ONNXRUNTIME:
        sha256 = expected_sha256 or verify(weights)
        build = functools.partial(_torch_module, spec, weights, sha256)
        runtime = onnx_runtime(spec.name, sha256, build, settings, device, preprocessing, export_in_child=True)
    else:
        checkpoint = load_checkpoint(weights, expected_sha256=expected_sha256)
        module = instantiate(spec, checkpoint.state_dict, weights.path)
        sha256 = checkpoint.sha256
        del checkpoint  # the module holds copies now: free the parsed tensors before the runtime is built
        runtime = torch_runtime(module, preprocessing, settings, device, multi_label=False)
    runner = make_runner(runtime, preprocessing, settings, device)
    labels = find_labels(spec.name, weights.path, runner.num_classes, "imagenet", indices_allowed=False)
    if weights.origin is Origin.RANDOM_INIT:
        _random_init_banner(spec.name, weights.path, weights.seed)
    logger.info("%s runs on %s (%s)", spec.name, runtime.info, device)
    return LoadedModel(
        name=spec.name,
        card=ModelCard("torchvision", spec.arch, "torchvision", labels.source, spec.aliases),
        runner=runner,
        labels=labels.names,
        preprocessing=preprocessing,
        weights=weights,
        sha256=sha256,
        num_parameters=runtime.num_parameters,
    )


def _torch_module(spec: ModelSpec, weights: WeightsFile, sha256: str) -> nn.Module:
    """The torch model, from bytes that hash to `sha256` (what the export is keyed by)."""
    checkpoint = load_checkpoint(weights, expected_sha256=sha256)
    return instantiate(spec, checkpoint.state_dict, weights.path)


def load_all(
    settings: ServerPlan, device: torch.device, weights: Mapping[str, VerifiedWeights] | None = None
) -> dict[str, LoadedModel]:
    """Load and warm every configured model, or raise StartupError: never half a set.

    With `weights` (from `resolve_weights`, keyed by model name), nothing is obtained again: each
    model loads from its given file, and only if the bytes still hash to the verified sha256."""
    if settings.decode_on_device and device.type != "cuda":
        logger.warning("--decode-on-device on %s: JPEGs are decoded on the forward thread, which only slows it", device)
    loaded: dict[str, LoadedModel] = {}
    for spec in parse_models(settings.models):
        if weights is None:
            found = obtain_weights(spec, settings) if isinstance(spec, ModelSpec) else user_file(spec)
            expected_sha256 = None
        else:
            given = weights.get(spec.name)
            if given is None:
                raise StartupError(f"no verified weights were handed over for {spec.name}")
            found, expected_sha256 = given.weights, given.sha256
        logger.info("loading %s from %s (%s)", spec.name, found.path, found.describe())
        if isinstance(spec, ModelSpec):
            model = load_model(spec, found, settings, device, expected_sha256=expected_sha256)
        else:
            model = load_file_model(spec, found, settings, device, expected_sha256=expected_sha256)
        sample = _sample_jpeg(model.preprocessing) if settings.decode_on_device else None
        model.runner.warm_up([1, settings.max_batch_size], jpeg=sample)
        loaded[spec.name] = model
    return loaded


def _random_init_banner(name: str, path: Path, seed: int | None) -> None:
    line = "!" * 78
    logger.warning(
        "\n%s\n!! %s SERVES RANDOM-INIT WEIGHTS (seed %s, %s)\n"
        "!! Its answers are meaningless. Run `resnet-serve weights fetch %s` where the internet is\n"
        "!! reachable, or put the official checkpoint in the weights directory.\n%s",
        line,
        name.upper(),
        "unknown" if seed is None else seed,
        path,
        name,
        line,
    )


def _sample_jpeg(preprocessing: Preprocessing) -> EncodedJpeg:
    """A small JPEG to start the device's decoder with before the first request needs it."""
    buffer = io.BytesIO()
    Image.new("RGB", (320, 240), (120, 80, 40)).save(buffer, format="JPEG")
    # The cap bounds the resized image too (341x256 here), so it is not the sample's own size.
    sample = inspect_jpeg(buffer.getvalue(), preprocessing, max_pixels=1_000_000)
    assert sample is not None
    return sample
