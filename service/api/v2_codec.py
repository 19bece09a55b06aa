"""The Open Inference Protocol's (KServe v2, Triton's HTTP API) infer bodies, both ways.

A request is JSON, or JSON followed by raw tensors (the binary tensor extension): the
`Inference-Header-Content-Length` header says where the JSON ends. A BYTES tensor in binary is its
elements one after another, each a 4-byte little-endian length and the bytes. In JSON, BYTES elements
are strings: an encoded image is not text, so JSON carries each image as a base64 string (as
TorchServe's and KServe's v2 image examples do); the binary extension carries the raw file.

The model has one input, `images` (BYTES, shape [N]: N encoded image files) and one output,
`probabilities` (FP32, [N, classes]). The classification extension turns that output into the top K
classes of each image as `"score:index:label"` strings (BYTES, [N, K]), the format Triton writes.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import InferenceFailed, InvalidInput

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
HEADER_LENGTH = "Inference-Header-Content-Length"
BYTES, FP32 = "BYTES", "FP32"

# Strict: a JSON string where the protocol wants a number or a boolean is refused, not coerced.
_STRICT = ConfigDict(strict=True, extra="allow")


class InputParameters(BaseModel):
    model_config = _STRICT
    binary_data_size: int | None = Field(default=None, ge=0, description="bytes of this input in the binary part")


class RequestInput(BaseModel):
    model_config = _STRICT
    name: str = Field(examples=[INPUT_NAME])
    shape: list[int] = Field(examples=[[1]], description="[N]: one element per encoded image")
    datatype: str = Field(examples=[BYTES])
    parameters: InputParameters = InputParameters()
    data: list[Any] | None = Field(default=None, description="base64 strings of the image files (JSON only)")


class OutputParameters(BaseModel):
    model_config = _STRICT
    binary_data: bool | None = Field(default=None, description="send this output in the binary part")
    classification: int = Field(default=0, ge=0, description="K > 0: the top K classes as 'score:index:label' strings")


class RequestOutput(BaseModel):
    model_config = _STRICT
    name: str = Field(examples=[OUTPUT_NAME])
    parameters: OutputParameters = OutputParameters()


class RequestParameters(BaseModel):
    model_config = _STRICT
    binary_data_output: bool = Field(default=False, description="send every output without its own choice in binary")


class InferRequest(BaseModel):
    model_config = _STRICT
    id: str | None = None
    parameters: RequestParameters = RequestParameters()
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


@dataclass(frozen=True)
class OutputRequest:
    name: str
    classification: int  # 0: the probabilities themselves
    binary: bool


@dataclass(frozen=True)
class DecodedRequest:
    id: str | None
    images: list[bytes]
    outputs: list[OutputRequest]


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary part of a request body."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise InvalidInput(
            f"{HEADER_LENGTH} must be the byte length of the JSON at the start of the body "
            f"({len(body)} bytes), got {header_length[:40]!r}"
        )
    return body[: int(header_length)], body[int(header_length) :]


def decode_request(header: bytes, binary: bytes, *, num_classes: int, max_images: int) -> DecodedRequest:
    try:
        request = InferRequest.model_validate_json(header)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'body'}: {error['msg']}" for error in exc.errors()[:5]
        )
        raise InvalidInput(f"invalid inference request: {problems}") from None
    if [i.name for i in request.inputs] != [INPUT_NAME]:
        names = ", ".join(repr(i.name) for i in request.inputs) or "none"
        raise InvalidInput(f"the model takes one input, {INPUT_NAME!r} (BYTES, encoded image files); got {names}")
    tensor = request.inputs[0]
    if tensor.datatype != BYTES:
        raise InvalidInput(f"input {INPUT_NAME!r} is {BYTES} (encoded image files), not {tensor.datatype[:40]}")
    if len(tensor.shape) != 1:
        raise InvalidInput(f"input {INPUT_NAME!r} has shape [N] (one element per image), got {tensor.shape}")
    count = tensor.shape[0]
    if count == 0:
        raise InvalidInput(f"input {INPUT_NAME!r} has no images: the batch is empty")
    if count > max_images:
        raise InvalidInput(f"{count} images in one request: the limit is {max_images} images a request")
    images = _binary_images(tensor, binary) if tensor.parameters.binary_data_size is not None else _json_images(tensor)
    if binary and tensor.parameters.binary_data_size is None:
        raise InvalidInput(f"the body has {len(binary)} binary bytes that no input claims (binary_data_size)")
    if len(images) != count:
        raise InvalidInput(f"input {INPUT_NAME!r} has shape [{count}] but {len(images)} elements")
    return DecodedRequest(request.id, images, _outputs(request, num_classes))


def _binary_images(tensor: RequestInput, binary: bytes) -> list[bytes]:
    size = tensor.parameters.binary_data_size
    if tensor.data is not None:
        raise InvalidInput(f"input {INPUT_NAME!r} has both JSON data and binary_data_size: send one")
    if size != len(binary):
        raise InvalidInput(f"binary_data_size of {INPUT_NAME!r} is {size}, but the binary part has {len(binary)} bytes")
    return decode_bytes(binary)


def _json_images(tensor: RequestInput) -> list[bytes]:
    if tensor.data is None:
        raise InvalidInput(f"input {INPUT_NAME!r} has no data: give base64 strings, or binary_data_size")
    images = []
    for index, element in enumerate(tensor.data):
        try:
            if not isinstance(element, str):
                raise ValueError
            images.append(base64.b64decode(element, validate=True))
        except (ValueError, binascii.Error):
            raise InvalidInput(
                f"element {index} of {INPUT_NAME!r} is not a base64 string: in JSON, send each image "
                "file base64-encoded, or send it raw with the binary tensor extension"
            ) from None
    return images


def _outputs(request: InferRequest, num_classes: int) -> list[OutputRequest]:
    default_binary = request.parameters.binary_data_output
    if request.outputs is None:
        return [OutputRequest(OUTPUT_NAME, 0, default_binary)]
    outputs = []
    for output in request.outputs:
        if output.name != OUTPUT_NAME:
            raise InvalidInput(f"the model has one output, {OUTPUT_NAME!r}; got {output.name[:40]!r}")
        k = output.parameters.classification
        if k > num_classes:
            raise InvalidInput(f"classification must be between 1 and {num_classes}, got {k}")
        binary = output.parameters.binary_data
        outputs.append(OutputRequest(output.name, k, default_binary if binary is None else binary))
    return outputs


def decode_bytes(buffer: bytes) -> list[bytes]:
    """A binary BYTES tensor's elements: each a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise InvalidInput(f"the binary BYTES tensor ends inside an element's length, at byte {offset}")
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise InvalidInput(f"a binary BYTES element of {length} bytes runs past the end of its tensor")
        elements.append(buffer[offset : offset + length])
        offset += length
    return elements


def encode_bytes(elements: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def classification(probabilities: npt.NDArray[np.float32], k: int, labels: Sequence[str]) -> list[list[str]]:
    """Each row's top k as Triton writes them: `"score:index:label"`, the score as C's `%f`."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    rows = zip(probabilities, order, strict=True)
    return [[f"{row[i]:f}:{i}:{labels[i]}" for i in top.tolist()] for row, top in rows]


def encode_response(
    model: str, version: str, decoded: DecodedRequest, probabilities: npt.NDArray[np.float32], labels: Sequence[str]
) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the length of its JSON header."""
    if not np.isfinite(probabilities).all():
        raise InferenceFailed(
            "the model produced a non-finite probability (NaN or infinity); with --dtype float16 "
            "this is an overflow: serve in float32 or bfloat16"
        )
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for requested in decoded.outputs:
        if requested.classification:
            strings = classification(probabilities, requested.classification, labels)
            shape, datatype = [len(strings), requested.classification], BYTES
            flat: list[Any] = [s for row in strings for s in row]
            raw = encode_bytes([s.encode() for s in flat]) if requested.binary else b""
        else:
            shape, datatype = list(probabilities.shape), FP32
            flat = probabilities.ravel().tolist()
            raw = probabilities.astype("<f4").tobytes() if requested.binary else b""
        output: dict[str, Any] = {"name": requested.name, "datatype": datatype, "shape": shape}
        if requested.binary:
            output["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            output["data"] = flat
        outputs.append(output)
    response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if decoded.id is not None:
        response["id"] = decoded.id
    header = json.dumps(response, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)
