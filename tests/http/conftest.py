"""The app in-process, with seeded random weights. Loaded models are cached across apps."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import ServerPlan, Settings
from service.engine import Engine
from service.models.registry import LoadedModel, load_all

_loaded: dict[tuple[Any, ...], dict[str, LoadedModel]] = {}


def cached_loader(settings: ServerPlan, device: torch.device) -> dict[str, LoadedModel]:
    """Load each (models, batch size, dtype, layout, execution plan) once per test session."""
    key = (
        settings.models,
        str(settings.weights_dir),
        settings.max_batch_size,
        settings.dtype,
        settings.channels_last,
        settings.batch_buckets,
        settings.cuda_graphs,
        settings.compile,
        settings.runtime,
        settings.quantize,
    )
    if key not in _loaded:
        _loaded[key] = load_all(settings, device)
    return _loaded[key]


@pytest.fixture(scope="session")
def make_settings(weights_dir: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"models": ("resnet18v1",), "weights_dir": weights_dir, "device": "cpu"}
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture(scope="session")
def client(make_settings) -> Iterator[TestClient]:
    """One app serving resnet18v1 and resnet50v1 for the read-only route tests."""
    app = create_app(make_settings(models=("resnet18v1", "resnet50v1")), load_models=cached_loader)
    with TestClient(app) as test_client:
        yield test_client


# Every runtime the server offers on a CPU: the correctness tests run for each.
CPU_RUNTIMES = ("torch", "onnxruntime")


@pytest.fixture(scope="session", params=CPU_RUNTIMES)
def runtime_client(request: pytest.FixtureRequest, make_settings) -> Iterator[TestClient]:
    """Like `client`, once per runtime (`request.param`)."""
    settings = make_settings(models=("resnet18v1", "resnet50v1"), runtime=request.param)
    with TestClient(create_app(settings, load_models=cached_loader)) as test_client:
        yield test_client


class Served(NamedTuple):
    http: httpx.AsyncClient
    engine: Engine


@pytest.fixture
def serve(make_settings) -> Callable[..., contextlib.AbstractAsyncContextManager[Served]]:
    """An async client on a fresh app with the given settings, lifespan included."""

    @contextlib.asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Served]:
        app = create_app(make_settings(**overrides), load_models=cached_loader)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
                yield Served(http, server_engine(app))

    return start


def server_engine(app: FastAPI) -> Engine:
    engine: Engine = app.state.server
    return engine


def upload(data: bytes, name: str = "image.jpg") -> dict[str, Any]:
    return {"files": [("data", (name, data, "application/octet-stream"))]}


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert set(body) == {"code", "type", "message"}, body
    assert body["code"] == response.status_code
    return body["code"], body["type"], body["message"]
