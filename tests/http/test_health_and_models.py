"""Health, readiness during startup, /models and /metrics."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import httpx
import onnxruntime
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.errors import StartupError
from service.models.registry import load_all
from tests.http.conftest import cached_loader, error_of, upload


def test_ping_and_health_when_ready(client):
    assert client.get("/ping").json() == {"status": "Healthy"}
    assert client.get("/health/live").json() == {"status": "alive"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}


def test_models_describe_architecture_weights_and_batching(client, weights_dir):
    listing = client.get("/models").json()["models"]
    assert [m["name"] for m in listing] == ["resnet18v1", "resnet50v1"]
    r18 = client.get("/models/resnet18").json()  # aliases work here too
    assert r18["name"] == "resnet18v1" and r18["architecture"] == "resnet18"
    assert r18["parameters"] == 11_689_512
    assert r18["input_size"] == [3, 224, 224] and r18["resize_size"] == 256
    assert (r18["device"], r18["dtype"], r18["num_classes"]) == ("cpu", "float32", 1000)
    # The CPU default: ONNX Runtime, running the export of these weights from the cache.
    details = r18["runtime_details"]
    assert r18["runtime"] == f"onnxruntime {onnxruntime.__version__}"
    assert (details["name"], details["version"]) == ("onnxruntime", onnxruntime.__version__)
    assert details["providers"] == ["CPUExecutionProvider"] and details["quantization"] == "none"
    exported = Path(details["file"])
    assert exported.suffix == ".onnx" and r18["weights"]["sha256"][:16] in exported.name
    assert hashlib.sha256(exported.read_bytes()).hexdigest() == details["file_sha256"]
    assert r18["weights"]["origin"] == "random-init" and r18["weights"]["seed"] == 0
    assert r18["weights"]["description"] == "random-init seed 0"
    assert len(r18["weights"]["sha256"]) == 64
    assert r18["batching"]["max_batch_size"] == 8
    assert error_of(client.get("/models/vgg16"))[:2] == (404, "ModelNotFound")


def test_the_torch_runtime_runs_no_file_of_its_own(runtime_client):
    model = runtime_client.get("/models/resnet18v1").json()
    details = model["runtime_details"]
    if details["name"] == "torch":
        assert model["runtime"] == f"torch {torch.__version__}"
        assert details["file"] is None and details["file_sha256"] is None and details["providers"] == []
    else:
        assert details["file"] is not None and Path(details["file"]).is_file()
    assert model["parameters"] == 11_689_512  # the same count, read from the export record or the module


def test_metrics_expose_batch_sizes_and_model_info(client, photos):
    client.post("/resnet18v1/predict", **upload(photos["kitten.jpg"]))
    text = client.get("/metrics").text
    assert 'resnet_serve_batch_size_count{model="resnet18v1"}' in text
    assert 'resnet_serve_model_info{arch="resnet18"' in text
    assert f'runtime="onnxruntime {onnxruntime.__version__}"' in text
    assert "resnet_serve_ready 1.0" in text
    assert 'resnet_serve_requests_total{code="200",model="resnet18v1",route="predict"}' in text
    assert "process_resident_memory_bytes" in text


async def test_not_healthy_until_every_model_is_warm(make_settings, photos):
    release = threading.Event()

    def slow_loader(settings, device):
        assert release.wait(timeout=30)
        return cached_loader(settings, device)

    app = create_app(make_settings(), load_models=slow_loader, background_load=True)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            assert (await http.get("/health/live")).status_code == 200
            ping = await http.get("/ping")
            assert (ping.status_code, ping.json()) == (503, {"status": "Unhealthy"})
            assert (await http.get("/health/ready")).json() == {"status": "starting"}
            refused = await http.post("/resnet18v1/predict", **upload(photos["kitten.jpg"]))
            assert error_of(refused)[:2] == (503, "ServiceUnavailable")
            assert error_of(await http.get("/models/resnet18v1"))[:2] == (503, "ServiceUnavailable")
            metrics = (await http.get("/metrics")).text
            assert 'resnet_serve_requests_total{code="503",model="resnet18v1",route="predict"} 1.0' in metrics
            release.set()
            for _ in range(200):
                if (await http.get("/ping")).status_code == 200:
                    break
                await __import__("asyncio").sleep(0.05)
            assert (await http.get("/ping")).json() == {"status": "Healthy"}


def test_failed_startup_reports_and_never_serves(make_settings, tmp_path):
    failures: list[str] = []
    app = create_app(make_settings(weights_dir=tmp_path), load_models=load_all, on_startup_failure=failures.append)
    with pytest.raises(StartupError, match="no weights for resnet18v1"), TestClient(app):
        pass
    assert failures and "resnet-serve weights fetch resnet18v1" in failures[0]
