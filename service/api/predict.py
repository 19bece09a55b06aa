"""The prediction routes: MMS 0.4 `/{model}/predict` and TorchServe `/predictions/{model}`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from service.api.accounting import counted, read_in_time, until_disconnect
from service.api.schemas import ERROR_RESPONSES, PREDICT_REQUEST_BODY, MMSPrediction, TorchServePrediction
from service.api.uploads import read_images
from service.engine import Engine, ModelPipeline
from service.errors import (
    InferenceFailed,
    InvalidInput,
)
from service.models.runner import ImageResult
from service.postprocessing import ClassScore, top_k

router = APIRouter(tags=["prediction"])

DEFAULT_TOPK = 5
TopK = Annotated[
    int | None,
    Query(description="How many classes to return, 1 to the model's class count (default 5, or fewer classes)"),
]
Formatter = Callable[[list[list[ClassScore]]], Any]
# Route endpoint names → the `route` label of the request metrics.
ROUTE_LABELS = {"predict_mms": "predict", "predict_torchserve": "predictions", "embed_images": "embed"}


def _mms_v04(results: list[list[ClassScore]]) -> Any:
    return {"prediction": [[{"class": s.label, "probability": s.probability} for s in r] for r in results]}


def _torchserve(results: list[list[ClassScore]]) -> Any:
    lists = [[{"probability": s.probability, "class": s.label} for s in r] for r in results]
    return lists[0] if len(lists) == 1 else lists


@router.post(
    "/{model}/predict",
    summary="Classify images (MMS 0.4 response)",
    response_model=MMSPrediction,
    responses=ERROR_RESPONSES,
    openapi_extra=PREDICT_REQUEST_BODY,
)
async def predict_mms(model: str, request: Request, topk: TopK = None) -> Response:
    return await _handle(request, model, topk, route="predict", formatter=_mms_v04)


@router.post(
    "/predictions/{model}",
    summary="Classify images (TorchServe / MMS 1.x response)",
    response_model=TorchServePrediction,
    responses=ERROR_RESPONSES,
    openapi_extra=PREDICT_REQUEST_BODY,
)
async def predict_torchserve(model: str, request: Request, topk: TopK = None) -> Response:
    return await _handle(request, model, topk, route="predictions", formatter=_torchserve)


async def _handle(request: Request, model: str, topk: int | None, *, route: str, formatter: Formatter) -> Response:
    async def work(engine: Engine) -> Response:
        results = await _classify(request, engine, engine.lookup(model), topk)
        return render(formatter(results))

    return await counted(request, model, route, work)


def count_refused_request(request: Request, status: int) -> None:
    """Count a model-route request that FastAPI refused before its handler ran (a bad `?topk=abc`)."""
    route = request.scope.get("route")
    label = ROUTE_LABELS.get(getattr(route, "name", ""))
    model = request.path_params.get("model")
    if label is None or not isinstance(model, str):
        return
    engine: Engine = request.app.state.server
    model_label = engine.metric_label(model)
    engine.metrics.requests.labels(model_label, label, str(status)).inc()
    if model_label != "unknown" and status == 400:
        engine.metrics.rejected.labels(model_label, "bad_input").inc()


def render(content: Any) -> JSONResponse:
    try:
        return JSONResponse(content)
    except ValueError:  # json refuses NaN and infinity: the forward produced a non-finite probability
        raise InferenceFailed(
            "the model produced a non-finite value (NaN or infinity); with --dtype float16 "
            "this is an overflow: serve in float32 or bfloat16"
        ) from None


async def _classify(
    request: Request, engine: Engine, pipeline: ModelPipeline, topk: int | None
) -> list[list[ClassScore]]:
    labels = pipeline.labels
    # The default never asks for more classes than a fine-tuned model has; an explicit one must fit.
    topk = min(DEFAULT_TOPK, len(labels)) if topk is None else topk
    if not 1 <= topk <= len(labels):
        raise InvalidInput(f"topk must be between 1 and {len(labels)} for {pipeline.name}, got {topk}")
    results = await run_images(request, engine, pipeline)
    return [top_k(r.probabilities, labels, topk) for r in results]


async def run_images(request: Request, engine: Engine, pipeline: ModelPipeline) -> list[ImageResult]:
    """The request's images (multipart `data` parts, or a raw body) through the model's batcher,
    within the request timeout: each image's probabilities and features, in order."""
    plan = engine.plan
    loop = asyncio.get_running_loop()
    deadline = loop.time() + plan.request_timeout_s
    with pipeline.admit(1) as reservation:
        read = read_images(
            request.headers.get("content-type", ""),
            request.headers.get("content-length"),
            request.stream(),
            request.app.state.upload_limits,
        )
        uploads = await read_in_time(request, engine, pipeline.name, read, deadline=deadline)
        await reservation.grow_to(len(uploads), deadline=deadline)
        images = await pipeline.prepare(uploads)
        tickets = pipeline.submit(reservation, images, deadline=deadline)
    return await pipeline.results(tickets, deadline=deadline, client_gone=until_disconnect(request.receive))
