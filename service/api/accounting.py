"""What every model route does around its work: admission before the body, the request metrics,
and the last courtesies of an early refusal. Shared by the MMS/TorchServe routes and /v2."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from service.engine import Engine
from service.errors import ClientDisconnected, DeadlineExceeded, QueueFull, ServeError, UploadTimeout

T = TypeVar("T")


async def counted(
    request: Request,
    model: str,
    route: str,
    work: Callable[[Engine], Awaitable[Response]],
    *,
    render_error: Callable[[ServeError], Response] | None = None,
) -> Response:
    """Run a model route's `work` and count it: requests by code, duration, in-flight, refusals.
    A ServeError is re-raised for the app's handlers, or rendered by `render_error` (a dialect with
    an error body of its own)."""
    engine: Engine = request.app.state.server
    metrics = engine.metrics
    arrived = time.perf_counter()
    model_label = engine.metric_label(model)
    code = 500
    metrics.inflight.inc()
    try:
        engine.ensure_accepting()
        response = await work(engine)
        code = 200
        return response
    except ServeError as exc:
        code = exc.status
        if not getattr(request.state, "body_read", False):
            await linger(request, engine.plan.max_upload_bytes)
        # Admission counts its own refusals (queue full) and the batcher its drops (deadline).
        counted_by_engine = isinstance(exc, QueueFull | DeadlineExceeded)
        if exc.reject_reason is not None and not counted_by_engine and model_label != "unknown":
            metrics.rejected.labels(model_label, exc.reject_reason).inc()
        if render_error is None:
            raise
        return render_error(exc)
    except ClientDisconnected:
        code = 499  # nginx's "client closed request": nobody reads this response
        raise
    finally:
        metrics.inflight.dec()
        metrics.requests.labels(model_label, route, str(code)).inc()
        if model_label != "unknown":
            metrics.request_duration.labels(model_label, route).observe(time.perf_counter() - arrived)


async def read_in_time(request: Request, engine: Engine, model: str, read: Awaitable[T], *, deadline: float) -> T:
    """Await the body's `read` within the upload timeout (and the request's `deadline`): a stalled
    upload must not hold its queue slot. A client that leaves meanwhile is counted as disconnected."""
    plan = engine.plan
    upload_deadline = min(deadline, asyncio.get_running_loop().time() + plan.upload_timeout_s)
    request.state.body_read = True
    try:
        async with asyncio.timeout_at(upload_deadline):
            return await read
    except TimeoutError:
        raise UploadTimeout(
            f"the upload did not arrive within {min(plan.upload_timeout_s, plan.request_timeout_s):g} s"
        ) from None
    except ClientDisconnect:
        engine.metrics.rejected.labels(model, "disconnected").inc()
        raise ClientDisconnected() from None


async def linger(request: Request, max_bytes: int, timeout_s: float = 1.0) -> None:
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


async def until_disconnect(receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
