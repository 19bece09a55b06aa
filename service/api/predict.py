"""The prediction routes: MMS 0.4 `/{model}/predict` and TorchServe `/predictions/{model}`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from service.api.schemas import ERROR_RESPONSES, PREDICT_REQUEST_BODY, MMSPrediction, TorchServePrediction
from service.api.state import ServedModel, ServerState
from service.api.uploads import read_images
from service.batching import Ticket
from service.errors import (
    ClientDisconnected,
    DeadlineExceeded,
    InvalidInput,
    QueueFull,
    ServeError,
    UploadTimeout,
)
from service.imaging import ModelInput, inspect_jpeg, preprocess
from service.postprocessing import ClassScore, top_k

router = APIRouter(tags=["prediction"])

TopK = Annotated[int, Query(description="How many classes to return, 1 to the model's class count")]
Formatter = Callable[[list[list[ClassScore]]], Any]


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
async def predict_mms(model: str, request: Request, topk: TopK = 5) -> JSONResponse:
    return await _handle(request, model, topk, route="predict", formatter=_mms_v04)


@router.post(
    "/predictions/{model}",
    summary="Classify images (TorchServe / MMS 1.x response)",
    response_model=TorchServePrediction,
    responses=ERROR_RESPONSES,
    openapi_extra=PREDICT_REQUEST_BODY,
)
async def predict_torchserve(model: str, request: Request, topk: TopK = 5) -> JSONResponse:
    return await _handle(request, model, topk, route="predictions", formatter=_torchserve)


async def _handle(request: Request, model: str, topk: int, *, route: str, formatter: Formatter) -> JSONResponse:
    state: ServerState = request.app.state.server
    metrics = state.metrics
    arrived = time.perf_counter()
    model_label = state.metric_label(model)
    code = 500
    metrics.inflight.inc()
    try:
        state.ensure_accepting()
        served = state.lookup(model)
        results = await _classify(request, state, served, topk)
        code = 200
        return JSONResponse(formatter(results))
    except ServeError as exc:
        code = exc.status
        if not getattr(request.state, "body_read", False):
            await _linger(request, state.settings.max_upload_bytes)
        # The batcher counts its own refusals (queue full) and drops (deadline) as they happen.
        counted_by_batcher = isinstance(exc, QueueFull | DeadlineExceeded)
        if exc.reject_reason is not None and not counted_by_batcher and model_label != "unknown":
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


async def _classify(request: Request, state: ServerState, served: ServedModel, topk: int) -> list[list[ClassScore]]:
    settings = state.settings
    labels = served.loaded.labels
    if not 1 <= topk <= len(labels):
        raise InvalidInput(f"topk must be between 1 and {len(labels)} for {served.name}, got {topk}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.request_timeout_s
    upload_deadline = min(deadline, loop.time() + settings.upload_timeout_s)
    # Admit before reading the body: an overloaded server refuses in microseconds.
    with served.batcher.reserve(1) as reservation:
        request.state.body_read = True
        try:
            # A stalled upload must not hold its queue slot: the body gets a deadline of its own.
            async with asyncio.timeout_at(upload_deadline):
                uploads = await read_images(
                    request.headers.get("content-type", ""),
                    request.headers.get("content-length"),
                    request.stream(),
                    state.upload_limits,
                )
        except TimeoutError:
            raise UploadTimeout(
                f"the upload did not arrive within {min(settings.upload_timeout_s, settings.request_timeout_s):g} s"
            ) from None
        except ClientDisconnect:
            state.metrics.rejected.labels(served.name, "disconnected").inc()
            raise ClientDisconnected() from None
        if len(uploads) > 1:
            reservation.grow(len(uploads) - 1)
        images = await _preprocess_all(state, served, uploads)
        tickets = [reservation.submit(image, deadline=deadline) for image in images]
    probabilities = await _wait_for(tickets, deadline, request.receive)
    return [top_k(p, labels, topk) for p in probabilities]


async def _linger(request: Request, max_bytes: int, timeout_s: float = 1.0) -> None:
    """Read and drop the body before an early refusal on a connection that will close.

    Closing a socket that still holds unread request bytes makes the kernel send a reset, which can
    destroy the 429 or 503 before the client reads it; a client that sees a reset retries at once
    instead of honouring Retry-After. Keep-alive connections need nothing: uvicorn discards the rest
    of the body itself. Bounded in bytes and time, so it cannot become a way to hold the server.
    """
    closing = request.headers.get("connection", "").lower() == "close" or request.scope.get("http_version") == "1.0"
    declared = request.headers.get("content-length", "")
    if not closing or not declared.isdigit() or int(declared) > max_bytes:
        return
    with contextlib.suppress(TimeoutError, ClientDisconnect):
        async with asyncio.timeout(timeout_s):
            async for _ in request.stream():
                pass


async def _preprocess_all(state: ServerState, served: ServedModel, uploads: list[bytes]) -> list[ModelInput]:
    loop = asyncio.get_running_loop()
    spec = served.loaded.preprocessing
    max_pixels = state.settings.max_image_pixels
    on_device = state.settings.decode_on_device
    histogram = state.metrics.preprocess_duration.labels(served.name)

    def work(data: bytes) -> ModelInput:
        started = time.perf_counter()
        try:
            # With --decode-on-device a JPEG's header is checked here and its pixels decoded with
            # its batch on the device; any other image is decoded here as always.
            encoded = inspect_jpeg(data, spec, max_pixels=max_pixels) if on_device else None
            return encoded if encoded is not None else preprocess(data, spec, max_pixels=max_pixels)
        finally:
            histogram.observe(time.perf_counter() - started)

    jobs = [loop.run_in_executor(state.decode_pool, work, data) for data in uploads]
    outcomes = await asyncio.gather(*jobs, return_exceptions=True)
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, ServeError):
            if len(uploads) > 1:
                outcome.message = f"image {index + 1} of {len(uploads)}: {outcome.message}"
            raise outcome
        if isinstance(outcome, BaseException):
            raise outcome
    return [o for o in outcomes if not isinstance(o, BaseException)]


async def _wait_for(
    tickets: list[Ticket[ModelInput, torch.Tensor]],
    deadline: float,
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
) -> list[torch.Tensor]:
    """Wait for every image's result, giving up at the deadline or when the client goes away."""
    loop = asyncio.get_running_loop()
    disconnected = loop.create_task(_until_disconnect(receive))
    waiting: set[asyncio.Future[Any]] = {t.future for t in tickets}
    try:
        while waiting:
            timeout = deadline - loop.time()
            if timeout <= 0:
                _abandon(tickets, "deadline")
                raise DeadlineExceeded("the request did not finish within the request timeout")
            done, waiting = await asyncio.wait(
                waiting | {disconnected}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if disconnected in done:
                _abandon(tickets, "disconnected")
                raise ClientDisconnected()
            waiting.discard(disconnected)
            for future in done:
                error = future.exception()
                if error is not None:
                    _abandon(tickets, getattr(error, "reject_reason", None) or "deadline")
                    raise error
        return [t.future.result() for t in tickets]
    finally:
        disconnected.cancel()


async def _until_disconnect(receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _abandon(tickets: list[Ticket[ModelInput, torch.Tensor]], reason: str) -> None:
    for ticket in tickets:
        ticket.abandon(reason)
