"""The Open Inference Protocol (KServe v2) through Triton's own HTTP client, against a live server:
metadata, readiness, infer with the binary tensor extension and the classification extension, and
the errors. tritonclient needs a real socket, so this cannot run in-process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.integration.live import LiveServer, running

pytestmark = pytest.mark.integration

MODEL = "resnet18v1"


@pytest.fixture(scope="module")
def server(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with running(weights, tmp_path_factory.mktemp("v2") / "server.log", "--device", "cpu") as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def images_input(*images: bytes, name: str = "images") -> triton.InferInput:
    tensor = triton.InferInput(name, [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    return tensor


def pixels_input() -> triton.InferInput:
    """A decoded image as FP32, as a Triton ResNet model takes it: not what this server takes."""
    tensor = triton.InferInput("images", [1, 3, 224, 224], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3, 224, 224), dtype=np.float32), binary_data=True)
    return tensor


def mms_top(server: LiveServer, image: bytes, k: int) -> list[dict[str, float | str]]:
    response = httpx.post(f"{server.url}/{MODEL}/predict?topk={k}", files={"data": image}, timeout=60)
    response.raise_for_status()
    prediction: list[dict[str, float | str]] = response.json()["prediction"][0]
    return prediction


def test_metadata_and_readiness(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "2")
    server = client.get_server_metadata()
    assert server["name"] == "resnet-serve"
    assert {"classification", "binary_tensor_data"} <= set(server["extensions"])
    model = client.get_model_metadata(MODEL)
    assert model["name"] == MODEL and model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    assert model["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}]


def test_binary_infer_agrees_with_the_mms_route(
    client: triton.InferenceServerClient, server: LiveServer, photos: dict[str, bytes]
) -> None:
    kitten, coffee = photos["kitten.jpg"], photos["coffee.jpg"]
    before = server.metric("resnet_serve_requests_total", model=MODEL, route="v2", code="200")
    result = client.infer(
        MODEL,
        [images_input(kitten, coffee)],
        outputs=[triton.InferRequestedOutput("probabilities", binary_data=True)],
        request_id="two-photos",
    )
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (2, 1000)
    assert result.get_response()["id"] == "two-photos"
    assert server.metric("resnet_serve_requests_total", model=MODEL, route="v2", code="200") == before + 1
    for row, photo in zip(probabilities, (kitten, coffee), strict=True):
        mms = mms_top(server, photo, 5)
        top = np.argsort(-row)[:5]
        assert row[top] == pytest.approx([s["probability"] for s in mms], abs=1e-6)


def test_classification_extension_matches_the_mms_top_3(
    client: triton.InferenceServerClient, server: LiveServer, photos: dict[str, bytes]
) -> None:
    photo = photos["chelsea.jpg"]
    for binary in (True, False):  # the strings in the binary part, then in the JSON
        result = client.infer(
            MODEL,
            [images_input(photo)],
            outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)],
        )
        (strings,) = result.as_numpy("probabilities")
        mms = mms_top(server, photo, 3)
        # Binary BYTES come back as bytes, JSON ones as str.
        parsed = [(s.decode() if isinstance(s, bytes) else s).split(":", 2) for s in strings]
        assert [label for _, _, label in parsed] == [s["class"] for s in mms]
        assert [float(score) for score, _, _ in parsed] == pytest.approx([s["probability"] for s in mms], abs=1e-6)
        assert all(score == f"{s['probability']:f}" for (score, _, _), s in zip(parsed, mms, strict=True))


@pytest.mark.parametrize(
    ("make_input", "status", "words"),
    [
        (lambda photo: images_input(photo, name="INPUT__0"), "400", "one input"),
        (lambda photo: pixels_input(), "400", "BYTES"),
        (lambda photo: images_input(), "400", "empty"),
        (lambda photo: images_input(photo[: len(photo) // 2]), "400", "image"),
    ],
    ids=["wrong-input-name", "wrong-datatype", "empty-batch", "broken-image"],
)
def test_bad_requests_are_400_with_the_protocols_error(
    client: triton.InferenceServerClient, photos: dict[str, bytes], make_input, status, words
) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.infer(MODEL, [make_input(photos["kitten.jpg"])])
    assert raised.value.status() == status
    assert words in raised.value.message()


def test_an_unknown_model_is_404(client: triton.InferenceServerClient, photos: dict[str, bytes]) -> None:
    for call in (lambda: client.get_model_metadata("resnet7"), lambda: client.infer("resnet7", [images_input(b"x")])):
        with pytest.raises(InferenceServerException) as raised:
            call()
        assert raised.value.status() == "404" and "resnet7" in raised.value.message()
