"""The Open Inference Protocol (KServe v2) in-process: the body codec, JSON infer, the binary
extension by hand, and the protocol's `{"error": ...}` bodies. tritonclient against a live server is
in tests/integration/test_v2_protocol.py."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest

from service.api import v2_codec as codec
from service.errors import InvalidInput
from tests.http.conftest import upload

INFER = "/v2/models/resnet18v1/infer"


def json_request(*images: bytes, **extra: object) -> dict[str, object]:
    data = [base64.b64encode(i).decode() for i in images]
    tensor = {"name": "images", "shape": [len(images)], "datatype": "BYTES", "data": data}
    return {"inputs": [tensor], **extra}


def v2_error(response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


def metric(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {sample}")


# -- the codec --------------------------------------------------------------------------------------


def test_bytes_tensors_round_trip_with_little_endian_lengths():
    elements = [b"", b"\xff\xd8 a jpeg", b"x" * 300]
    encoded = codec.encode_bytes(elements)
    assert encoded[:4] == struct.pack("<I", 0) and encoded[4:8] == struct.pack("<I", 9)
    assert codec.decode_bytes(encoded) == elements


@pytest.mark.parametrize("buffer", [b"\x05\x00", struct.pack("<I", 9) + b"short"])
def test_a_cut_bytes_tensor_is_refused(buffer):
    with pytest.raises(InvalidInput, match="binary BYTES"):
        codec.decode_bytes(buffer)


def test_classification_strings_are_tritons_score_index_label():
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32)
    strings = codec.classification(probabilities, 2, ["a", "b", "c"])
    assert strings == [["0.700000:1:b", "0.200000:2:c"], ["0.500000:0:a", "0.250000:1:b"]]


def test_the_header_length_must_fit_the_body():
    assert codec.split_body(b'{"a":1}BIN', "7") == (b'{"a":1}', b"BIN")
    for bad in ("11", "-1", "x"):
        with pytest.raises(InvalidInput, match="Inference-Header-Content-Length"):
            codec.split_body(b'{"a":1}BIN', bad)


# -- the routes -------------------------------------------------------------------------------------


async def test_json_infer_matches_the_mms_route_and_counts_as_v2(serve, photos):
    photo = photos["chelsea.jpg"]
    async with serve() as served:
        response = await served.http.post(INFER, json=json_request(photo, photo, id="req-7"))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_name"] == "resnet18v1" and body["model_version"] == "1" and body["id"] == "req-7"
        (output,) = body["outputs"]
        assert (output["name"], output["datatype"], output["shape"]) == ("probabilities", "FP32", [2, 1000])
        probabilities = np.array(output["data"], dtype=np.float32).reshape(2, 1000)
        mms = (await served.http.post("/resnet18v1/predict?topk=5", **upload(photo))).json()["prediction"][0]
        top5 = np.argsort(-probabilities[0])[:5]
        assert [served.engine.pipelines["resnet18v1"].labels[i] for i in top5] == [s["class"] for s in mms]
        assert probabilities[0][top5] == pytest.approx([s["probability"] for s in mms], abs=1e-6)
        assert probabilities[1] == pytest.approx(probabilities[0], abs=1e-6)
        text = (await served.http.get("/metrics")).text
        assert metric(text, 'resnet_serve_requests_total{code="200",model="resnet18v1",route="v2"}') == 1
        assert metric(text, 'resnet_serve_requests_total{code="400",model="resnet18v1",route="v2"}') == 0


async def test_binary_request_and_classification_output_by_hand(serve, photos):
    """The binary extension both ways, and a classification output in JSON beside a binary one."""
    photo = photos["coffee.jpg"]
    raw = codec.encode_bytes([photo])
    header = json.dumps(
        {
            "inputs": [
                {"name": "images", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}
            ],
            "outputs": [
                {"name": "probabilities", "parameters": {"binary_data": True}},
                {"name": "probabilities", "parameters": {"classification": 3, "binary_data": False}},
            ],
        }
    ).encode()
    async with serve() as served:
        response = await served.http.post(
            INFER, content=header + raw, headers={"Inference-Header-Content-Length": str(len(header))}
        )
        assert response.status_code == 200, response.text
        length = int(response.headers["Inference-Header-Content-Length"])
        head = json.loads(response.content[:length])
        binary, classes = head["outputs"]
        assert binary["parameters"]["binary_data_size"] == 4000 and "data" not in binary
        probabilities = np.frombuffer(response.content[length:], dtype="<f4")
        assert probabilities.shape == (1000,) and probabilities.sum() == pytest.approx(1, abs=1e-4)
        assert classes["datatype"] == "BYTES" and classes["shape"] == [1, 3]
        labels = served.engine.pipelines["resnet18v1"].labels
        expected = [f"{probabilities[i]:f}:{i}:{labels[i]}" for i in np.argsort(-probabilities)[:3]]
        assert classes["data"] == expected


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"inputs": [{"name": "INPUT__0", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}]}, "one input"),
        ({"inputs": [{"name": "images", "shape": [1], "datatype": "FP32", "data": [0.5]}]}, "BYTES"),
        ({"inputs": [{"name": "images", "shape": [0], "datatype": "BYTES", "data": []}]}, "empty"),
        ({"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES", "data": ["AA=="]}]}, "1 elements"),
        ({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]}, "base64"),
        ({"inputs": [{"name": "images", "shape": ["1"], "datatype": "BYTES", "data": ["AA=="]}]}, "shape"),
        ({"inputs": []}, "one input"),
        (json_request(b"x", outputs=[{"name": "logits"}]), "one output"),
        (json_request(b"x", outputs=[{"name": "probabilities", "parameters": {"classification": 1001}}]), "1000"),
    ],
)
async def test_bad_requests_get_400_in_the_protocols_error_shape(serve, body, problem):
    async with serve() as served:
        response = await served.http.post(INFER, json=body)
        assert response.status_code == 400
        assert problem in v2_error(response)
        text = (await served.http.get("/metrics")).text
        assert metric(text, 'resnet_serve_requests_total{code="400",model="resnet18v1",route="v2"}') == 1
        assert metric(text, 'resnet_serve_rejected_total{model="resnet18v1",reason="bad_input"}') == 1


async def test_a_broken_image_an_unknown_model_and_a_big_body(serve, photos):
    async with serve(max_upload_bytes=100_000, max_images_per_request=2) as served:
        broken = await served.http.post(
            INFER, json=json_request(photos["kitten.jpg"][: len(photos["kitten.jpg"]) // 2])
        )
        assert broken.status_code == 400 and "image" in v2_error(broken)
        unknown = await served.http.post("/v2/models/resnet7/infer", json=json_request(b"x"))
        assert unknown.status_code == 404 and "resnet7" in v2_error(unknown)
        metadata = await served.http.get("/v2/models/resnet7")
        assert metadata.status_code == 404 and "resnet7" in v2_error(metadata)
        version = await served.http.get("/v2/models/resnet18v1/versions/2/ready")
        assert version.status_code == 404 and "version" in v2_error(version)
        big = await served.http.post(INFER, json=json_request(b"x" * 100_000))
        assert big.status_code == 413 and "100000 bytes" in v2_error(big)
        many = await served.http.post(INFER, json=json_request(b"x", b"y", b"z"))
        assert many.status_code == 400 and "limit is 2" in v2_error(many)


async def test_metadata_and_readiness(serve):
    async with serve() as served:
        server = (await served.http.get("/v2")).json()
        assert server["name"] == "resnet-serve"
        assert set(server["extensions"]) == {"classification", "binary_tensor_data"}
        model = (await served.http.get("/v2/models/resnet18v1/versions/1")).json()
        assert model["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
        assert model["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}]
        assert (await served.http.get("/v2/health/ready")).status_code == 200
        assert (await served.http.get("/v2/models/resnet18v1/ready")).status_code == 200
        served.engine.begin_drain()
        assert (await served.http.get("/v2/health/ready")).status_code == 503
        assert (await served.http.get("/v2/health/live")).status_code == 200
        draining = await served.http.post(INFER, json=json_request(b"x"))
        assert draining.status_code == 503 and "shutting down" in v2_error(draining)


async def test_a_full_queue_is_429_with_retry_after_before_the_body_is_read(serve, photos):
    async with serve(max_queue_size=2) as served:
        held = served.engine.pipelines["resnet18v1"].admit(2)
        response = await served.http.post(INFER, json=json_request(photos["kitten_small.jpg"]))
        held.release()
        assert response.status_code == 429 and "queue" in v2_error(response).lower()
        assert int(response.headers["retry-after"]) >= 1
        text = (await served.http.get("/metrics")).text
        assert metric(text, 'resnet_serve_requests_total{code="429",model="resnet18v1",route="v2"}') == 1
        assert (await served.http.post(INFER, json=json_request(photos["kitten_small.jpg"]))).status_code == 200
