"""Every error the API documents: its status and its JSON body. A bad request fails only itself."""

from __future__ import annotations

import asyncio
import io

import pytest
import torch
from PIL import Image

from service.errors import InsufficientStorage
from tests.http.conftest import error_of, upload


def test_unknown_model_is_404_and_lists_the_loaded_ones(client, photos):
    response = client.post("/resnet19/predict", **upload(photos["kitten.jpg"]))
    code, type_, message = error_of(response)
    assert (code, type_) == (404, "ModelNotFound")
    assert "resnet18v1" in message and "resnet50v1" in message


def test_unknown_route_is_json_404(client):
    assert error_of(client.get("/nope"))[:2] == (404, "NotFound")


def test_wrong_method_is_json_405(client):
    assert error_of(client.get("/resnet18v1/predict"))[:2] == (405, "MethodNotAllowed")


def test_missing_image_field_names_the_expected_field(client, photos):
    response = client.post("/resnet18v1/predict", files=[("file", ("k.jpg", photos["kitten.jpg"], "image/jpeg"))])
    code, type_, message = error_of(response)
    assert (code, type_) == (400, "InvalidInput")
    assert "'data'" in message and "'file'" in message


def test_no_body_at_all_is_400(client):
    code, _, message = error_of(client.post("/resnet18v1/predict"))
    assert code == 400 and "no image" in message


def test_empty_image_part_is_400(client):
    code, _, message = error_of(client.post("/resnet18v1/predict", **upload(b"")))
    assert code == 400 and "empty" in message


def test_not_an_image_is_415(client):
    response = client.post("/resnet18v1/predict", **upload(b"just some text, not a picture", "notes.txt"))
    code, type_, message = error_of(response)
    assert (code, type_) == (415, "UnsupportedMediaType")
    assert "not an image" in message


def test_truncated_image_is_400(client, photos):
    code, type_, message = error_of(client.post("/resnet18v1/predict", **upload(photos["kitten.jpg"][:4000])))
    assert (code, type_) == (400, "InvalidInput") and "decoded" in message


def test_urlencoded_body_is_told_how_to_send_an_image(client):
    response = client.post("/resnet18v1/predict", data={"data": "kitten"})
    code, _, message = error_of(response)
    assert code == 400 and "multipart/form-data" in message


@pytest.mark.parametrize(("topk", "fragment"), [("0", "between 1 and 1000"), ("1001", "between 1 and 1000"),
                                                ("abc", "topk")])  # fmt: skip
def test_bad_topk_is_400(client, photos, topk, fragment):
    code, type_, message = error_of(client.post(f"/resnet18v1/predict?topk={topk}", **upload(photos["kitten.jpg"])))
    assert (code, type_) == (400, "InvalidInput") and fragment in message


def test_one_bad_image_among_several_names_its_position(client, photos):
    files = [("data", ("a.jpg", photos["kitten.jpg"], "image/jpeg")), ("data", ("b.txt", b"oops", "text/plain"))]
    code, _, message = error_of(client.post("/resnet18v1/predict", files=files))
    assert code == 415 and message.startswith("image 2 of 2")


async def test_upload_over_the_limit_is_413_from_content_length(serve, photos):
    async with serve(max_upload_bytes=10_000) as served:
        response = await served.http.post("/resnet18v1/predict", **upload(photos["kitten.jpg"]))
        code, type_, message = error_of(response)
        assert (code, type_) == (413, "PayloadTooLarge") and "10000 bytes" in message
        assert response.headers["connection"] == "close"


async def test_streamed_upload_over_the_limit_is_413_without_content_length(serve, photos):
    async def chunks():
        for _ in range(100):
            yield b"x" * 1000

    async with serve(max_upload_bytes=10_000) as served:
        response = await served.http.post(
            "/resnet18v1/predict", content=chunks(), headers={"Content-Type": "image/jpeg"}
        )
        assert error_of(response)[:2] == (413, "PayloadTooLarge")


async def test_too_many_pixels_is_400(serve):
    buffer = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buffer, format="PNG")
    async with serve(max_image_pixels=1_000_000) as served:
        response = await served.http.post("/resnet18v1/predict", **upload(buffer.getvalue()))
        code, _, message = error_of(response)
        assert code == 400 and "4000000 pixels" in message


async def test_too_many_parts_is_400(serve, photos):
    files = [("data", (f"{i}.jpg", photos["kitten_small.jpg"], "image/jpeg")) for i in range(5)]
    async with serve(max_images_per_request=4) as served:
        code, _, message = error_of(await served.http.post("/resnet18v1/predict", files=files))
        assert code == 400 and "limit is 4" in message


async def test_full_queue_is_429_with_retry_after_and_counted(serve, photos):
    async with serve(max_queue_size=2) as served:
        held = served.engine.pipelines["resnet18v1"].admit(2)
        response = await served.http.post("/resnet18v1/predict", **upload(photos["kitten.jpg"]))
        held.release()
        code, type_, _ = error_of(response)
        assert (code, type_) == (429, "QueueFull")
        assert int(response.headers["retry-after"]) >= 1
        metrics = (await served.http.get("/metrics")).text
        assert 'resnet_serve_rejected_total{model="resnet18v1",reason="queue_full"} 1.0' in metrics
        # the slots came back: the next request is served
        assert (await served.http.post("/resnet18v1/predict", **upload(photos["kitten.jpg"]))).status_code == 200


async def test_deadline_passing_in_the_queue_is_504_and_never_computed(serve, photos):
    async with serve(request_timeout_s=0.2, max_batch_size=1) as served:
        runner = served.engine.pipelines["resnet18v1"].loaded.runner
        gate = asyncio.Event()
        original = runner.results
        loop = asyncio.get_running_loop()

        def slow(images):
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(timeout=10)
            return original(images)

        runner.results = slow
        try:
            first = asyncio.create_task(served.http.post("/resnet18v1/predict", **upload(photos["kitten.jpg"])))
            second = asyncio.create_task(served.http.post("/resnet18v1/predict", **upload(photos["coffee.jpg"])))
            await asyncio.sleep(0.5)  # both requests are now past their 0.2 s deadline
            gate.set()
            responses = await asyncio.gather(first, second)
        finally:
            del runner.results
        assert [error_of(r)[:2] for r in responses] == [(504, "DeadlineExceeded")] * 2
        metrics = (await served.http.get("/metrics")).text
        # The first was already in its forward when time ran out; the second never ran.
        assert 'resnet_serve_images_total{model="resnet18v1"} 1.0' in metrics
        assert 'resnet_serve_rejected_total{model="resnet18v1",reason="deadline"} 1.0' in metrics


async def test_a_failing_forward_fails_only_its_batch(serve, photos):
    async with serve() as served:
        runner = served.engine.pipelines["resnet18v1"].loaded.runner
        calls = {"n": 0}
        original = runner.results

        def flaky(images):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected fault at /secret/path.py")
            return original(images)

        runner.results = flaky
        try:
            failed = await served.http.post("/resnet18v1/predict", **upload(photos["kitten.jpg"]))
            recovered = await served.http.post("/resnet18v1/predict", **upload(photos["kitten.jpg"]))
        finally:
            del runner.results
        assert error_of(failed)[:2] == (500, "InferenceFailed")
        assert "/secret" not in failed.text and "Traceback" not in failed.text
        assert recovered.status_code == 200


async def test_draining_refuses_new_work_with_503(serve, photos):
    async with serve() as served:
        served.engine.begin_drain()
        response = await served.http.post("/resnet18v1/predict", **upload(photos["kitten.jpg"]))
        assert error_of(response)[:2] == (503, "ServiceUnavailable")
        assert (await served.http.get("/health/ready")).json() == {"status": "draining"}
        assert (await served.http.get("/ping")).status_code == 503


def test_errors_never_carry_tracebacks_or_paths(client, photos):
    for response in (
        client.post("/resnet18v1/predict", **upload(photos["kitten.jpg"][:3000])),
        client.post("/resnet18v1/predict", **upload(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)),
    ):
        assert response.status_code in (400, 415)
        assert (
            "Traceback" not in response.text and "/work" not in response.text and "site-packages" not in response.text
        )


def test_openapi_documents_routes_and_errors(client):
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/{model}/predict"]["post"]
    assert {"400", "404", "413", "415", "429", "503", "504"} <= set(predict["responses"])
    assert "multipart/form-data" in predict["requestBody"]["content"]
    assert "/predictions/{model}" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_every_model_answers_after_errors(client, photos):
    client.post("/resnet18v1/predict", **upload(b"bad"))
    ok = client.post("/resnet18v1/predict", **upload(photos["kitten.jpg"]))
    assert ok.status_code == 200
    assert torch.tensor([e["probability"] for e in ok.json()["prediction"][0]]).sum() <= 1.0


async def test_device_out_of_memory_is_507_for_that_batch_only(serve, photos):
    async with serve() as served:
        runner = served.engine.pipelines["resnet18v1"].loaded.runner

        def out_of_memory(images):
            raise InsufficientStorage("the GPU is out of memory even for a single image")

        runner.results = out_of_memory
        try:
            failed = await served.http.post("/resnet18v1/predict", **upload(photos["kitten.jpg"]))
        finally:
            del runner.results
        assert error_of(failed)[:2] == (507, "InsufficientStorage")
        assert (await served.http.post("/resnet18v1/predict", **upload(photos["kitten.jpg"]))).status_code == 200
