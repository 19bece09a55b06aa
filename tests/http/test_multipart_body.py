"""A multipart body cut before its closing boundary is a 400, not an answer with fewer predictions."""

from __future__ import annotations

import pytest
import skimage.data

from tests.conftest import jpeg_bytes
from tests.http.conftest import error_of

BOUNDARY = b"cut-here"
HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY.decode()}"}
CLOSING = b"--" + BOUNDARY + b"--\r\n"


@pytest.fixture(scope="module")
def two_image_body() -> bytes:
    images = [jpeg_bytes(skimage.data.chelsea()), jpeg_bytes(skimage.data.rocket())]
    parts = [
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="data"; filename="' + b"%d.jpg" % i + b'"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n"
        for i, image in enumerate(images)
    ]  # fmt: skip
    return b"".join(parts) + CLOSING


def test_a_complete_two_image_body_gets_two_predictions(client, two_image_body):
    response = client.post("/resnet18v1/predict?topk=1", content=two_image_body, headers=HEADERS)
    assert response.status_code == 200, response.text
    assert len(response.json()["prediction"]) == 2


@pytest.mark.parametrize("cut", [len(CLOSING), len(b"--\r\n")], ids=["no-closing-boundary", "no-final-dashes"])
def test_a_two_image_body_without_its_closing_boundary_is_400(client, two_image_body, cut):
    response = client.post("/resnet18v1/predict?topk=1", content=two_image_body[:-cut], headers=HEADERS)
    code, type_, message = error_of(response)
    assert (code, type_) == (400, "InvalidInput")
    assert "ended before its closing boundary" in message
