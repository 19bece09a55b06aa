"""Behaviours a line-by-line review found (issue 9): each one reproduced through the app."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from service.api.app import create_app
from service.models.catalog import CATALOG
from service.models.runner import ImageResult

from .conftest import cached_loader, error_of, upload

BOUNDARY = "hardening-boundary"


def multipart(*images: bytes) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="data"; filename="{i}.jpg"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + image
        + b"\r\n"
        for i, image in enumerate(images)
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


class GatedForward:
    """Holds the model's forward at a gate and records the size of each batch it was given."""

    def __init__(self, runner: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.runner = runner
        self.loop = loop
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.batches: list[int] = []
        self._original = runner.results

    def __call__(self, images: list[Any]) -> Any:
        self.batches.append(len(images))
        self.loop.call_soon_threadsafe(self.entered.set)
        asyncio.run_coroutine_threadsafe(self.gate.wait(), self.loop).result(timeout=30)
        return self._original(images)

    @contextlib.contextmanager
    def installed(self) -> Iterator[GatedForward]:
        self.runner.results = self
        try:
            yield self
        finally:
            self.gate.set()
            del self.runner.results


async def until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll a condition the app reaches on its own (no event to wait on), failing clearly if it never does."""
    async with asyncio.timeout(timeout_s):
        for _ in itertools.count():
            if condition():
                return
            await asyncio.sleep(0.01)


def metric(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


async def test_item1_a_many_image_request_admitted_before_the_drain_is_answered(serve, photos):
    """Its reservation grows after SIGTERM (the body finishes later): that growth is not refused."""
    async with serve() as served:
        body = multipart(photos["kitten.jpg"], photos["coffee.jpg"])
        first_sent = asyncio.Event()
        rest = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield body[:100]
            first_sent.set()
            await rest.wait()
            yield body[100:]

        request = asyncio.create_task(served.http.post("/resnet18v1/predict", content=slow_body(), headers=MULTIPART))
        await asyncio.wait_for(first_sent.wait(), 10)
        pipeline = served.engine.pipelines["resnet18v1"]
        await until(lambda: pipeline.batcher.depth == 1)  # admitted: its one slot is held while the body streams
        served.engine.begin_drain()
        rest.set()
        response = await asyncio.wait_for(request, 30)
        assert response.status_code == 200, response.text
        assert len(response.json()["prediction"]) == 2


async def test_item4_a_three_class_model_answers_a_plain_request(make_settings, tmp_path: Path, photos):
    torch.manual_seed(0)
    state = CATALOG["resnet18v1"].builder(weights=None, num_classes=3).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "resnet18v1.safetensors")
    (tmp_path / "resnet18v1.labels.txt").write_text("cat\ndog\nbird\n")
    app = create_app(make_settings(weights_dir=tmp_path), load_models=cached_loader)
    async with app.router.lifespan_context(app):
        import httpx

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            plain = await http.post("/resnet18v1/predict", **upload(photos["kitten.jpg"]))
            assert plain.status_code == 200, plain.text
            assert sorted(c["class"] for c in plain.json()["prediction"][0]) == ["bird", "cat", "dog"]
            too_many = await http.post("/resnet18v1/predict?topk=4", **upload(photos["kitten.jpg"]))
            assert error_of(too_many)[:2] == (400, "InvalidInput")
            assert "between 1 and 3" in error_of(too_many)[2]


async def test_item8_a_request_cancelled_at_shutdown_is_never_computed(serve, photos):
    async with serve(max_batch_size=1) as served:
        pipeline = served.engine.pipelines["resnet18v1"]
        with GatedForward(pipeline.loaded.runner, asyncio.get_running_loop()).installed() as forward:
            running = asyncio.create_task(served.http.post("/resnet18v1/predict", **upload(photos["kitten.jpg"])))
            await asyncio.wait_for(forward.entered.wait(), 10)
            queued = asyncio.create_task(served.http.post("/resnet18v1/predict", **upload(photos["coffee.jpg"])))
            await until(lambda: pipeline.batcher.queued == 1)  # queued behind the running forward
            queued.cancel()  # what uvicorn does to request tasks left after the grace period
            with pytest.raises(asyncio.CancelledError):
                await queued
            forward.gate.set()
            assert (await asyncio.wait_for(running, 30)).status_code == 200
        await pipeline.batcher.close(timeout_s=10)
        assert forward.batches == [1], "the cancelled request's image was computed"
        text = (await served.http.get("/metrics")).text
        assert metric(text, 'resnet_serve_rejected_total{model="resnet18v1",reason="cancelled"}') == 1


async def test_item8_shutdown_takes_the_grace_period_once(serve, photos):
    """The HTTP server already spent the grace waiting for requests: the batchers get what is left."""
    async with serve(max_batch_size=1, shutdown_grace_s=30) as served:
        engine = served.engine
        pipeline = engine.pipelines["resnet18v1"]
        with GatedForward(pipeline.loaded.runner, asyncio.get_running_loop()).installed() as forward:
            running = asyncio.create_task(served.http.post("/resnet18v1/predict", **upload(photos["kitten.jpg"])))
            await asyncio.wait_for(forward.entered.wait(), 10)
            queued = asyncio.create_task(served.http.post("/resnet18v1/predict", **upload(photos["coffee.jpg"])))
            await until(lambda: pipeline.batcher.queued == 1)
            engine.begin_drain()
            engine.drain_deadline = time.monotonic() - 1  # the grace is already spent
            closing = asyncio.create_task(pipeline.batcher.close(timeout_s=engine.drain_time_left_s()))
            left = await asyncio.wait_for(asyncio.shield(closing), 5)
            assert left == 1
            forward.gate.set()
            await asyncio.gather(running, queued, return_exceptions=True)
        assert error_of(queued.result())[:2] == (503, "ServiceUnavailable")


async def test_item11_an_early_refusal_does_not_ask_a_100_continue_client_for_its_body(serve, photos):
    async with serve() as served:
        served.engine.begin_drain()
        pulled = []

        async def body() -> AsyncIterator[bytes]:
            pulled.append(True)
            yield photos["kitten.jpg"]

        headers = {
            "Connection": "close",
            "Expect": "100-continue",
            "Content-Length": str(len(photos["kitten.jpg"])),
            "Content-Type": "image/jpeg",
        }
        response = await served.http.post("/resnet18v1/predict", content=body(), headers=headers)
        assert error_of(response)[:2] == (503, "ServiceUnavailable")
        assert pulled == [], "the refused body was read"


async def test_item13_a_response_that_cannot_render_is_counted_as_500(serve, photos):
    async with serve() as served:
        runner = served.engine.pipelines["resnet18v1"].loaded.runner
        runner.results = lambda images: [
            ImageResult(torch.full((1000,), float("nan")), torch.zeros(512)) for _ in images
        ]
        try:
            response = await served.http.post("/resnet18v1/predict", **upload(photos["kitten.jpg"]))
        finally:
            del runner.results
        code, type_, message = error_of(response)
        assert (code, type_) == (500, "InferenceFailed") and "non-finite" in message
        text = (await served.http.get("/metrics")).text
        assert metric(text, 'resnet_serve_requests_total{code="200",model="resnet18v1",route="predict"}') == 0
        assert metric(text, 'resnet_serve_requests_total{code="500",model="resnet18v1",route="predict"}') == 1


async def test_item13_images_dropped_with_a_failed_batch_are_not_counted_as_deadline(serve, photos):
    async with serve(max_batch_size=1) as served:
        runner = served.engine.pipelines["resnet18v1"].loaded.runner

        def failing(images: list[Any]) -> Any:
            raise RuntimeError("injected fault")

        runner.results = failing
        try:
            body = multipart(photos["kitten.jpg"], photos["coffee.jpg"], photos["astronaut.jpg"])
            response = await served.http.post("/resnet18v1/predict", content=body, headers=MULTIPART)
        finally:
            del runner.results
        assert error_of(response)[:2] == (500, "InferenceFailed")
        text = (await served.http.get("/metrics")).text
        assert metric(text, 'resnet_serve_rejected_total{model="resnet18v1",reason="deadline"}') == 0
        assert metric(text, 'resnet_serve_rejected_total{model="resnet18v1",reason="request_failed"}') >= 1


def test_item13_a_bad_topk_is_counted_in_requests_total(client, photos):
    sample = 'resnet_serve_requests_total{code="400",model="resnet18v1",route="predictions"}'
    before = metric(client.get("/metrics").text, sample)
    response = client.post("/predictions/resnet18v1?topk=abc", **upload(photos["kitten.jpg"]))
    assert error_of(response)[:2] == (400, "InvalidInput")
    assert metric(client.get("/metrics").text, sample) == before + 1


async def test_item14_models_loading_after_sigterm_leave_the_server_draining(make_settings):
    loaded = asyncio.Event()
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_loader(settings: Any, device: torch.device) -> Any:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=30)
        models = cached_loader(settings, device)
        loop.call_soon_threadsafe(loaded.set)
        return models

    app = create_app(make_settings(), load_models=slow_loader, background_load=True)
    async with app.router.lifespan_context(app):
        import httpx

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            assert (await http.get("/health/ready")).json() == {"status": "starting"}
            app.state.server.begin_drain()  # SIGTERM while loading
            release.set()
            await asyncio.wait_for(loaded.wait(), 60)
            await until(lambda: bool(app.state.server.pipelines))
            ready = await http.get("/health/ready")
            assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
            assert (await http.get("/ping")).status_code == 503


async def test_item7b_the_engine_hands_its_decode_pool_to_the_runner_for_host_fallbacks(serve):
    async with serve(decode_on_device=True) as served:
        pipeline = served.engine.pipelines["resnet18v1"]
        assert pipeline.loaded.runner._fallback_executor is served.engine.pools.decode
        assert served.engine.pools.decode is not served.engine.pools.forward
