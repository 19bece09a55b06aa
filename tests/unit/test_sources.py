"""`--models`: catalog names and NAME=PATH[#preset] files, and the one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import Settings
from service.errors import StartupError
from service.models.catalog import CATALOG
from service.models.sources import FileModel, configured_names, parse_models


def test_catalog_names_and_files_mix_in_order():
    requests = parse_models(("resnet18", "zoo50=/models/resnet50-v2-7.onnx", "cub=/w/r50_cub.pth#cub"))
    assert requests == [
        CATALOG["resnet18v1"],
        FileModel("zoo50", Path("/models/resnet50-v2-7.onnx")),
        FileModel("cub", Path("/w/r50_cub.pth"), "cub"),
    ]
    names = configured_names(("resnet18v1", "zoo50=/m/a.onnx"))
    assert names["resnet18"] == "resnet18v1" and names["zoo50"] == "zoo50" and "a" not in names


def test_the_environment_variable_takes_the_same_syntax(monkeypatch):
    monkeypatch.setenv("RESNET_SERVE_MODELS", "resnet50v1, mine=/w/mine.safetensors#torchvision")
    assert Settings().models == ("resnet50v1", "mine=/w/mine.safetensors#torchvision")


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("resnet18=/w/x.pth", "already the catalog model resnet18v1 (an alias)"),
        ("resnet50v1=/w/x.pth", "already the catalog model resnet50v1"),
        ("my model=/w/x.pth", "must be 1-64 letters"),
        ("a/b=/w/x.pth", "must be 1-64 letters"),
        ("mine=", "no file after '='"),
        ("mine=/w/x.txt", "not a model file this server reads"),
        ("mine=/w/x.pth#nosuch", "unknown preset 'nosuch'; known: torchvision"),
        ("resnet19", "unknown model 'resnet19'"),
    ],
)
def test_each_mistake_is_one_line_naming_it(entry, says):
    with pytest.raises(StartupError) as raised:
        parse_models((entry,))
    assert says in str(raised.value) and "\n" not in str(raised.value)


def test_a_name_given_twice_is_refused_but_a_catalog_model_twice_loads_once():
    with pytest.raises(StartupError, match="names 'mine' twice"):
        parse_models(("mine=/w/a.pth", "mine=/w/b.onnx"))
    assert parse_models(("resnet18", "resnet18v1", "resnet50v1")) == [CATALOG["resnet18v1"], CATALOG["resnet50v1"]]
