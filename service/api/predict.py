"""The prediction routes: MMS 0.4 `/{model}/predict` and TorchServe `/predictions/{model}`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from service.api.schemas import ERROR_RESPONSES, PREDICT_REQUEST_BODY, MMSPrediction, TorchServePrediction
from service.api.uploads import read_images
from service.engine import Engine, ModelPipeline
from service.errors import (
    ClientDisconnected,
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    QueueFull,
    ServeError,
    UploadTimeout,
)
from service.postprocessing import ClassScore, top_k

router = APIRouter(tags=["prediction"])

DEFAULT_TOPK = 5
TopK = Annotated[
    int | None,
    Query(description="How many classes to return, 1 to the model's class count (default 5, or fewer classes)"),
]
Formatter = Callable[[list[list[ClassScore]]], Any]
# Route endpoint names → the `route` label of the request metrics.
ROUTE_LABELS = {"predict_mms": "predict", "predict_torchserve": "predictions"}


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
async def predict_mms(model: str, request: Request, topk: TopK = None) -> JSONResponse:
    return await _handle(request, model, topk, route="predict", formatter=_mms_v04)


@router.post(
    "/predictions/{model}",
    summary="Classify images (TorchServe / MMS 1.x response)",
    response_model=TorchServePrediction,
    responses=ERROR_RESPONSES,
    openapi_extra=PREDICT_REQUEST_BODY,
)
async def predict_torchserve(model: str, request: Request, topk: TopK = None) -> JSONResponse:
    return await _handle(request, model, topk, route="predictions", formatter=_torchserve)


async def _handle(request: Request, model: str, topk: int | None, *, route: str, formatter: Formatter) -> JSONResponse:
    engine: Engine = request.app.state.server
    metrics = engine.metrics
    arrived = time.perf_counter()
    model_label = engine.metric_label(model)
    code = 500
    metrics.inflight.inc()
    try:
        engine.ensure_accepting()
        pipeline = engine.lookup(model)
        results = await _classify(request, engine, pipeline, topk)
        response = _render(formatter(results))
        code = 200
        return response
    except ServeError as exc:
        code = exc.status
        if not getattr(request.state, "body_read", False):
            await _linger(request, engine.plan.max_upload_bytes)
        # Admission counts its own refusals (queue full) and the batcher its drops (deadline).
        counted_by_engine = isinstance(exc, QueueFull | DeadlineExceeded)
        if exc.reject_reason is not None and not counted_by_engine and model_label != "unknown":
            metrics.rejected.labels(model_label, exc.reject_reason).inc()
        raise
    except ClientDisconnected:
        code = 499  # nginx's "client closed request": nobody reads this response
        raise
    finally:
        metrics.inflight.dec()
        metrics.requests.labels(model_label, route, str(code)).inc()
        if model_label != "unknown":
            metrics.request_duration.labels(model_label, route).observe(time.perf_counter() - arrived)


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


def _render(content: Any) -> JSONResponse:
    try:
        return JSONResponse(content)
    except ValueError:  # json refuses NaN and infinity: the forward produced a non-finite probability
        raise InferenceFailed(
            "the model produced a non-finite probability (NaN or infinity); with --dtype float16 "
            "this is an overflow: serve in float32 or bfloat16"
        ) from None


async def _classify(
    request: Request, engine: Engine, pipeline: ModelPipeline, topk: int | None
) -> list[list[ClassScore]]:
    plan = engine.plan
    labels = pipeline.labels
    # The default never asks for more classes than a fine-tuned model has; an explicit one must fit.
    topk = min(DEFAULT_TOPK, len(labels)) if topk is None else topk
    if not 1 <= topk <= len(labels):
        raise InvalidInput(f"topk must be between 1 and {len(labels)} for {pipeline.name}, got {topk}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + plan.request_timeout_s
    upload_deadline = min(deadline, loop.time() + plan.upload_timeout_s)
    with pipeline.admit(1) as reservation:
        request.state.body_read = True
        try:
            # A stalled upload must not hold its queue slot: the body gets a deadline of its own.
            async with asyncio.timeout_at(upload_deadline):
                uploads = await read_images(
                    request.headers.get("content-type", ""),
                    request.headers.get("content-length"),
                    request.stream(),
                    request.app.state.upload_limits,
                )
        except TimeoutError:
            raise UploadTimeout(
                f"the upload did not arrive within {min(plan.upload_timeout_s, plan.request_timeout_s):g} s"
            ) from None
        except ClientDisconnect:
            engine.metrics.rejected.labels(pipeline.name, "disconnected").inc()
            raise ClientDisconnected() from None
        await reservation.grow_to(len(uploads), deadline=deadline)
        images = await pipeline.prepare(uploads)
        tickets = pipeline.submit(reservation, images, deadline=deadline)
    probabilities = await pipeline.results(tickets, deadline=deadline, client_gone=_until_disconnect(request.receive))
    return [top_k(p, labels, topk) for p in probabilities]


async def _linger(request: Request, max_bytes: int, timeout_s: float = 1.0) -> None:
    """Read and drop the body before an early refusal on a connection that will close.

    Closing a socket that still holds unread request bytes makes the kernel send a reset, which can
    destroy the 429 or 503 before the client reads it; a client that sees a reset retries at once
    instead of honouring Retry-After. Keep-alive connections need nothing: uvicorn discards the rest
    of the body itself. A client that sent `Expect: 100-continue` has not sent its body and waits
    to be asked: reading would ask it for bytes only to drop them. Bounded in bytes and time, so it
    cannot become a way to hold the server.
    """
    closing = request.headers.get("connection", "").lower() == "close" or request.scope.get("http_version") == "1.0"
    declared = request.headers.get("content-length", "")
    expects_continue = request.headers.get("expect", "").lower() == "100-continue"
    if not closing or expects_continue or not declared.isdigit() or int(declared) > max_bytes:
        return
    with contextlib.suppress(TimeoutError, ClientDisconnect):
        async with asyncio.timeout(timeout_s):
            async for _ in request.stream():
                pass


async def _until_disconnect(receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
