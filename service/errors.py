"""Domain errors. Each carries the HTTP status and type that the edge turns into a JSON body.

They live outside `api/` so the batcher and the imaging code can raise them without knowing HTTP.
"""

from __future__ import annotations

from typing import ClassVar


class ServeError(Exception):
    """Base of every error a caller may see; `message` is written for a person to act on."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "InternalServerError"
    # The label of `resnet_serve_rejected_total{reason}`, where the error is a refusal.
    reject_reason: ClassVar[str | None] = None

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class ModelNotFound(ServeError):
    status = 404
    type = "ModelNotFound"


class InvalidInput(ServeError):
    status = 400
    type = "InvalidInput"
    reject_reason = "bad_input"


class UnsupportedMediaType(ServeError):
    status = 415
    type = "UnsupportedMediaType"
    reject_reason = "bad_input"


class PayloadTooLarge(ServeError):
    status = 413
    type = "PayloadTooLarge"
    reject_reason = "too_large"


class UploadTimeout(ServeError):
    status = 408
    type = "RequestTimeout"
    reject_reason = "deadline"


class QueueFull(ServeError):
    status = 429
    type = "QueueFull"
    reject_reason = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServeError):
    status = 504
    type = "DeadlineExceeded"
    reject_reason = "deadline"


class ServiceUnavailable(ServeError):
    status = 503
    type = "ServiceUnavailable"


class InferenceFailed(ServeError):
    status = 500
    type = "InferenceFailed"


class InsufficientStorage(ServeError):
    """The device ran out of memory even for the smallest split of the batch."""

    status = 507
    type = "InsufficientStorage"


class ClientDisconnected(Exception):
    """The caller went away; nobody is left to answer, so this never becomes a response."""

    reject_reason = "disconnected"


class StartupError(Exception):
    """A problem that stops the server before it serves: one clear line for the operator."""
