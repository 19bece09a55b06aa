"""The Open Inference Protocol (KServe v2, Triton's HTTP API): health, metadata and infer under /v2.

The infer route goes through the same pipeline, deadlines, caps and metrics (route label `v2`) as
the MMS routes; only the dialect differs, errors included: `{"error": "..."}` with the same status.
The body formats are in `v2_codec`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from service import __version__
from service.api import v2_codec as codec
from service.api.accounting import counted, read_in_time, until_disconnect
from service.api.uploads import UploadLimits
from service.engine import Engine, ModelPipeline, Phase
from service.errors import (
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
    ServeError,
    UploadTimeout,
)

router = APIRouter(prefix="/v2", tags=["kserve v2"])

VERSION = "1"  # each model has one version
EXTENSIONS = ["classification", "binary_tensor_data"]
PLATFORM = "pytorch_torchvision"


class V2Error(BaseModel):
    error: str = Field(examples=["model 'resnet7' is not served here; loaded models: resnet18v1"])


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class Liveness(BaseModel):
    live: bool


class Readiness(BaseModel):
    ready: bool


class InferOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[float] | list[str] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": V2Error} for status in statuses}


def _inlined(schema: dict[str, Any]) -> Any:
    """A model's JSON schema with its `$defs` put in place: a `#/$defs/...` reference would not
    resolve inside the OpenAPI document."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            named = definitions[node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else {}
            return {key: resolve(value) for key, value in {**named, **node}.items() if key != "$ref"}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": f"JSON, or JSON then raw tensors with the `{codec.HEADER_LENGTH}` header (the binary "
        "tensor extension). One input, `images`: BYTES, shape [N], base64 strings in JSON, raw files in binary",
        "content": {"application/json": {"schema": _inlined(codec.InferRequest.model_json_schema())}},
    }
}


def error_response(exc: ServeError) -> JSONResponse:
    headers = dict(exc.headers)
    if isinstance(exc, PayloadTooLarge | UploadTimeout):
        headers["Connection"] = "close"  # the rest of the body was never read
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.server
    return engine


def _pipeline(engine: Engine, model: str, version: str | None) -> ModelPipeline:
    pipeline = engine.lookup(model)
    if version is not None and version != VERSION:
        raise ModelNotFound(f"model {pipeline.name!r} has no version {version[:40]!r}; its one version is {VERSION}")
    return pipeline


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="resnet-serve", version=__version__, extensions=EXTENSIONS)


@router.get("/health/live", response_model=Liveness, summary="The process answers")
async def live() -> Liveness:
    return Liveness(live=True)


@router.get("/health/ready", response_model=Readiness, responses={503: {"model": Readiness}}, summary="Serving")
async def ready(request: Request) -> JSONResponse:
    is_ready = _engine(request).phase is Phase.READY
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/models/{model}", response_model=ModelMetadata, responses=_errors(404, 503), summary="Model metadata")
@router.get(
    "/models/{model}/versions/{version}",
    response_model=ModelMetadata,
    responses=_errors(404, 503),
    summary="Model metadata",
)
async def model_metadata(model: str, request: Request, version: str | None = None) -> Any:
    try:
        pipeline = _pipeline(_engine(request), model, version)
    except ServeError as exc:
        return error_response(exc)
    return ModelMetadata(
        name=pipeline.name,
        versions=[VERSION],
        platform=PLATFORM,
        inputs=[TensorMetadata(name=codec.INPUT_NAME, datatype=codec.BYTES, shape=[-1])],
        outputs=[TensorMetadata(name=codec.OUTPUT_NAME, datatype=codec.FP32, shape=[-1, len(pipeline.labels)])],
    )


@router.get("/models/{model}/ready", response_model=Readiness, responses=_errors(404, 503), summary="Model ready")
@router.get(
    "/models/{model}/versions/{version}/ready",
    response_model=Readiness,
    responses=_errors(404, 503),
    summary="Model ready",
)
async def model_ready(model: str, request: Request, version: str | None = None) -> JSONResponse:
    engine = _engine(request)
    try:
        _pipeline(engine, model, version)
    except ServeError as exc:
        return error_response(exc)
    is_ready = engine.phase is Phase.READY
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.post(
    "/models/{model}/infer",
    response_model=InferResponse,
    responses=_errors(400, 404, 408, 413, 415, 429, 500, 503, 504, 507),
    openapi_extra=_INFER_BODY,
    summary="Classify images",
)
@router.post(
    "/models/{model}/versions/{version}/infer",
    response_model=InferResponse,
    responses=_errors(400, 404, 408, 413, 415, 429, 500, 503, 504, 507),
    openapi_extra=_INFER_BODY,
    summary="Classify images",
)
async def infer(model: str, request: Request, version: str | None = None) -> Response:
    async def work(engine: Engine) -> Response:
        return await _infer(request, engine, _pipeline(engine, model, version))

    return await counted(request, model, "v2", work, render_error=error_response)


async def _infer(request: Request, engine: Engine, pipeline: ModelPipeline) -> Response:
    plan = engine.plan
    limits: UploadLimits = request.app.state.upload_limits
    loop = asyncio.get_running_loop()
    deadline = loop.time() + plan.request_timeout_s
    with pipeline.admit(1) as reservation:
        body = await read_in_time(
            request, engine, pipeline.name, _read_body(request, limits.max_bytes), deadline=deadline
        )
        header, binary = codec.split_body(body, request.headers.get(codec.HEADER_LENGTH))
        decoded = codec.decode_request(header, binary, num_classes=len(pipeline.labels), max_images=limits.max_images)
        await reservation.grow_to(len(decoded.images), deadline=deadline)
        images = await pipeline.prepare(decoded.images)
        tickets = pipeline.submit(reservation, images, deadline=deadline)
    results = await pipeline.results(tickets, deadline=deadline, client_gone=until_disconnect(request.receive))
    probabilities = np.stack([r.probabilities.numpy() for r in results]).astype(np.float32, copy=False)
    content, header_length = codec.encode_response(pipeline.name, VERSION, decoded, probabilities, pipeline.labels)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={codec.HEADER_LENGTH: str(header_length)})


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 from Content-Length or at the first chunk past the cap."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"the body is over the limit of {max_bytes} bytes ({declared} bytes declared)")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise PayloadTooLarge(f"the body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    if not total:
        raise InvalidInput("the body is empty: send an inference request (JSON, or JSON then binary tensors)")
    return b"".join(chunks)
