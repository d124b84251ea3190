"""Exceptions raised by the Grid client.

Every error response from the gateway has the body
``{"error": {"code": ..., "message": ..., "field": ...}}`` and maps to one
subclass of GridError by its HTTP status, or by its status and code for the
errors in CODE_EXCEPTIONS.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .info import ModelInfo, Placement

# The number of body characters quoted when an error response is not JSON.
BODY_EXCERPT_CHARS = 200


class GridError(Exception):
    """An error reported by the gateway, or raised by the client on its behalf.

    ``status`` is the HTTP status (None when no response arrived), ``code`` a
    stable machine-readable code, and ``field`` the request field at fault, if
    the gateway named one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "error",
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.field = field

    def __str__(self) -> str:
        prefix = f"HTTP {self.status} " if self.status is not None else ""
        suffix = f" (field: {self.field})" if self.field else ""
        return f"{prefix}{self.code}: {self.message}{suffix}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"message={self.message!r}, field={self.field!r})"
        )


class InvalidInput(GridError):
    """HTTP 400: the request or one of its fields is invalid."""


class Unauthorized(GridError):
    """HTTP 401: the token is missing, invalid or revoked."""


class Forbidden(GridError):
    """HTTP 403: the token is valid but may not do this."""


class NotFound(GridError):
    """HTTP 404: the model, node or route does not exist."""


class Conflict(GridError):
    """HTTP 409: for example, a model with this model_id already exists."""


class VerificationMismatch(Conflict):
    """HTTP 409 verification_mismatch: two replicas returned different outputs.

    Raised for ``verify=2``. The message names both nodes and the output that
    differs, and the gateway records the mismatch on both nodes.
    """


class PayloadTooLarge(GridError):
    """HTTP 413: the uploaded model or the inference body is over the limit."""


class UnsupportedMediaType(GridError):
    """HTTP 415: the body has the wrong Content-Type."""


class ModelError(GridError):
    """HTTP 422: the model raised an error while computing the inference."""


class RateLimited(GridError):
    """HTTP 429: too many requests, still returned after the client's retries."""


class Unavailable(GridError):
    """HTTP 503: no node can serve the request, still after the client's retries."""


class GatewayTimeout(GridError, TimeoutError):
    """HTTP 504: the inference did not finish within its timeout."""


class GridConnectionError(GridError, ConnectionError):
    """The gateway could not be reached at its URL."""


class PlacementError(GridError):
    """A model that did not reach a ready replica.

    ``model`` is the last model info the client fetched, and ``placements``
    lists the placements at fault: failed ones for a failed placement, or the
    ones still pending for a PlacementTimeout.
    """

    def __init__(
        self,
        message: str,
        *,
        model: ModelInfo,
        placements: list[Placement],
        code: str = "placement_failed",
    ) -> None:
        super().__init__(message, code=code)
        self.model = model
        self.placements = placements


class PlacementTimeout(PlacementError, TimeoutError):
    """A model that was still placing when serve_model stopped waiting.

    The gateway keeps placing it, so a later ``get_model`` may find it ready.
    """


STATUS_EXCEPTIONS: dict[int, type[GridError]] = {
    400: InvalidInput,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ModelError,
    429: RateLimited,
    503: Unavailable,
    504: GatewayTimeout,
}

# Errors identified by their status and code. Each class subclasses the class
# of its status, so callers that catch the status's class still catch it.
CODE_EXCEPTIONS: dict[tuple[int, str], type[GridError]] = {
    (409, "verification_mismatch"): VerificationMismatch,
}


def error_from_response(status: int, body: bytes) -> GridError:
    """Build the exception for an error response from its status and body.

    A body that is not the gateway's error JSON still maps by status, with code
    ``unexpected_response`` and the start of the body as the message, because a
    proxy in front of the gateway may respond with HTML or plain text.
    """
    cls = STATUS_EXCEPTIONS.get(status, GridError)
    detail = _parse_error_body(body)
    if detail is None:
        excerpt = body[:BODY_EXCERPT_CHARS].decode("utf-8", errors="replace").strip()
        message = f"unexpected response body: {excerpt!r}" if excerpt else "empty body"
        return cls(message, status=status, code="unexpected_response")

    code = detail.get("code")
    message = detail.get("message")
    field = detail.get("field")
    cls = CODE_EXCEPTIONS.get((status, str(code)), cls)
    return cls(
        str(message) if message else f"HTTP {status}",
        status=status,
        code=str(code) if code else "error",
        field=str(field) if field else None,
    )


def _parse_error_body(body: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    detail = payload.get("error")
    if not isinstance(detail, dict):
        return None
    return detail
