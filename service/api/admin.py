"""Health, model description and metrics routes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.schemas import (
    ERROR_RESPONSES,
    BatchingInfo,
    HealthStatus,
    ModelInfo,
    ModelList,
    Preprocessing,
    RuntimeDetails,
    WeightsInfo,
)
from service.engine import Engine, ModelPipeline, Phase

router = APIRouter()


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.server
    return engine


@router.get("/ping", tags=["health"], response_model=HealthStatus, responses={503: {"model": HealthStatus}})
async def ping(request: Request) -> JSONResponse:
    """`Healthy` only when every model is loaded and warm (TorchServe's contract)."""
    healthy = _engine(request).phase is Phase.READY
    return JSONResponse({"status": "Healthy" if healthy else "Unhealthy"}, status_code=200 if healthy else 503)


@router.get("/health/live", tags=["health"], response_model=HealthStatus)
async def live() -> JSONResponse:
    """The process is up and its event loop answers."""
    return JSONResponse({"status": "alive"})


@router.get("/health/ready", tags=["health"], response_model=HealthStatus, responses={503: {"model": HealthStatus}})
async def ready(request: Request) -> JSONResponse:
    """200 while serving; 503 while starting, draining or after a failed start."""
    phase = _engine(request).phase
    return JSONResponse({"status": phase.value}, status_code=200 if phase is Phase.READY else 503)


@router.get("/models", tags=["models"], response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    engine = _engine(request)
    return ModelList(models=[describe(engine, pipeline) for pipeline in engine.pipelines.values()])


@router.get("/models/{model}", tags=["models"], response_model=ModelInfo, responses={404: ERROR_RESPONSES[404]})
async def get_model(model: str, request: Request) -> ModelInfo:
    engine = _engine(request)
    return describe(engine, engine.lookup(model))


@router.get("/metrics", tags=["metrics"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    return Response(_engine(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def describe(engine: Engine, pipeline: ModelPipeline) -> ModelInfo:
    loaded, batcher = pipeline.loaded, pipeline.batcher
    crop = loaded.preprocessing.crop_size
    weights = loaded.weights
    runtime = loaded.runner.runtime.info
    return ModelInfo(
        name=loaded.name,
        aliases=list(loaded.card.aliases),
        architecture=loaded.card.architecture,
        family=loaded.card.family,
        preprocessing=Preprocessing(
            preset=loaded.card.preset,
            description=loaded.preprocessing.describe(),
            scores="sigmoid (multi-label)" if loaded.card.multi_label else "softmax",
        ),
        label_source=loaded.card.label_source,
        embedding_dim=loaded.runner.feature_dim,
        parameters=loaded.num_parameters,
        input_size=[3, crop, crop],
        resize_size=loaded.preprocessing.resize_size,
        device=str(engine.device),
        dtype=engine.plan.dtype,
        runtime=str(runtime),
        runtime_details=RuntimeDetails(
            name=runtime.name,
            version=runtime.version,
            file=str(runtime.file) if runtime.file is not None else None,
            file_sha256=runtime.file_sha256,
            providers=list(runtime.providers),
            quantization=runtime.quantization,
        ),
        num_classes=len(loaded.labels),
        batching=BatchingInfo(
            max_batch_size=batcher.max_batch_size,
            max_delay_ms=batcher.max_delay_s * 1000,
            max_queue_size=pipeline.admission.capacity,
            queue_depth=batcher.depth,
            batches_run=batcher.batches_run,
            images_run=batcher.items_run,
            mean_batch_size=batcher.items_run / batcher.batches_run if batcher.batches_run else 0.0,
            max_batches_in_flight=batcher.max_in_flight,
            buckets=list(loaded.runner.plan.buckets),
            cuda_graphs=loaded.runner.plan.cuda_graphs,
            compiled=loaded.runner.plan.compile,
            decode_on_device=engine.plan.decode_on_device,
        ),
        weights=WeightsInfo(
            file=weights.path.name,
            sha256=loaded.sha256,
            origin=weights.origin.value,
            description=weights.describe(),
            seed=weights.seed,
        ),
    )
