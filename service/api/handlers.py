"""Every error becomes `{"code": int, "type": str, "message": str}`; no traceback leaves the server."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ClientDisconnected, PayloadTooLarge, ServeError, UploadTimeout

logger = logging.getLogger(__name__)

_HTTP_TYPES = {404: "NotFound", 405: "MethodNotAllowed"}


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": status, "type": type_, "message": message}, status_code=status, headers=headers)


async def _serve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServeError)
    headers = dict(exc.headers)
    if isinstance(exc, PayloadTooLarge | UploadTimeout):
        # The rest of the body was never read; the connection cannot be reused.
        headers["Connection"] = "close"
    return error_response(exc.status, exc.type, exc.message, headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(
        f"{'.'.join(str(p) for p in error.get('loc', ()))}: {error.get('msg', 'invalid')}" for error in exc.errors()
    )
    # Imported here: the prediction routes import this module's siblings, not the other way round.
    from service.api.predict import count_refused_request

    count_refused_request(request, 400)
    return error_response(400, "InvalidInput", f"invalid request: {problems}")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see /docs for the API"
    # Starlette's headers carry what the status needs, e.g. `Allow` on a 405 (RFC 9110).
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, _HTTP_TYPES.get(exc.status_code, "HTTPError"), message, headers)


async def _client_gone(request: Request, exc: Exception) -> JSONResponse:
    return error_response(499, "ClientDisconnected", "the client went away")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "InternalServerError", "internal error; the server log has the details")


def install(app: FastAPI) -> None:
    app.add_exception_handler(ServeError, _serve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnected, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
