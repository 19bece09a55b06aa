"""Response shapes, for the OpenAPI document at /docs (the routes build their JSON directly)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel


class ErrorBody(BaseModel):
    code: int = Field(examples=[400])
    type: str = Field(examples=["InvalidInput"])
    message: str = Field(examples=["the image could not be decoded: image file is truncated"])


class ClassProbability(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    class_: str = Field(alias="class", examples=["n02123045 tabby, tabby cat"])
    probability: float = Field(examples=[0.42])


class MMSPrediction(BaseModel):
    prediction: list[list[ClassProbability]] = Field(description="One list per uploaded image, in upload order")


class TorchServePrediction(RootModel[list[ClassProbability] | list[list[ClassProbability]]]):
    """A bare list for one image; a list of such lists for several."""


class HealthStatus(BaseModel):
    status: str


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_delay_ms: float
    max_queue_size: int
    queue_depth: int
    batches_run: int
    images_run: int
    mean_batch_size: float
    max_batches_in_flight: int
    buckets: list[int] = Field(description="sizes a batch is padded up to; empty: each runs at its own size")
    cuda_graphs: bool
    compiled: bool
    decode_on_device: bool


class WeightsInfo(BaseModel):
    file: str
    sha256: str
    origin: str = Field(description="official, random-init or user")
    description: str
    seed: int | None = None


class RuntimeDetails(BaseModel):
    name: str = Field(examples=["onnxruntime"], description="torch or onnxruntime")
    version: str = Field(examples=["1.32.0"])
    file: str | None = Field(
        description="the model file the runtime executes (the ONNX export of the weights); none for torch"
    )
    file_sha256: str | None = None
    providers: list[str] = Field(description="onnxruntime's execution providers, in order of preference")
    quantization: str = Field(examples=["none"], description="none, or how the model was quantised")


class Preprocessing(BaseModel):
    preset: str = Field(examples=["torchvision"], description="the preset naming the family's evaluation pipeline")
    description: str = Field(
        examples=[
            "resize the short edge to 256 (pil bilinear), centre crop 224, mean [123.675, 116.28, 103.53], "
            "std [58.395, 57.12, 57.375] (0-255)"
        ]
    )
    scores: str = Field(examples=["softmax"], description="softmax, or sigmoid for a multi-label head")


class ModelInfo(BaseModel):
    name: str
    aliases: list[str]
    family: str = Field(examples=["torchvision"], description="torchvision, mmpretrain, onnx-zoo or onnx")
    architecture: str
    preprocessing: Preprocessing
    label_source: str = Field(examples=["ImageNet-1k synsets"], description="where the class labels come from")
    embedding_dim: int = Field(examples=[2048], description="the length of /embed's vectors")
    parameters: int
    input_size: list[int]
    resize_size: int
    device: str
    dtype: str
    runtime: str = Field(examples=["onnxruntime 1.32.0"], description="what runs the forward, with its version")
    runtime_details: RuntimeDetails
    num_classes: int
    batching: BatchingInfo
    weights: WeightsInfo


class ModelList(BaseModel):
    models: list[ModelInfo]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("Missing, empty, undecodable or oversized-in-pixels image; bad `topk`; malformed body"),
    404: _error("No such model is loaded"),
    408: _error("The body did not arrive within `upload_timeout_s`"),
    413: _error("The upload is over `max_upload_bytes`"),
    415: _error("The upload is not an image in a supported format"),
    429: _error("The model's queue is full; retry after the `Retry-After` header's seconds"),
    500: _error("The forward failed for this request's batch"),
    503: _error("The server is starting or draining"),
    504: _error("The request timed out (`request_timeout_s`)"),
    507: _error("The GPU ran out of memory even for a single image"),
}

PREDICT_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "data": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "format": "binary"},
                            "description": "One or more images (JPEG, PNG, GIF, WebP, BMP, TIFF, PPM, ICO), "
                            "at most `max_images_per_request` (default 64)",
                        }
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


class Embeddings(BaseModel):
    model: str
    dim: int = Field(examples=[2048], description="the length of each embedding: 512 for ResNet-18/34, 2048 above")
    normalized: bool = Field(description="whether each embedding was scaled to unit L2 norm (`?normalize=true`)")
    embeddings: list[list[float]] = Field(
        description="one embedding per image, in upload order: the globally pooled features the "
        "classifier head reads (mmpretrain's `extract_feat`)"
    )
