"""One JSON error shape for every API response:

    {"error": {"code": "invalid_input", "message": "...", "field": "input"}}

``ApiError`` carries it from services and views; ``exception_handler`` turns
DRF's own exceptions into the same shape.
"""

from __future__ import annotations

from typing import Any

from django.http import JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


class ApiError(Exception):
    def __init__(self, status_code: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}

    def response(self) -> JsonResponse:
        response = JsonResponse(self.body(), status=self.status_code)
        for name, value in self.headers.items():
            response[name] = value
        return response


_DRF_CODES = {
    status.HTTP_400_BAD_REQUEST: "invalid_input",
    status.HTTP_401_UNAUTHORIZED: "unauthenticated",
    status.HTTP_403_FORBIDDEN: "forbidden",
    status.HTTP_404_NOT_FOUND: "not_found",
    status.HTTP_405_METHOD_NOT_ALLOWED: "method_not_allowed",
    status.HTTP_406_NOT_ACCEPTABLE: "not_acceptable",
    status.HTTP_413_REQUEST_ENTITY_TOO_LARGE: "payload_too_large",
    status.HTTP_415_UNSUPPORTED_MEDIA_TYPE: "unsupported_media_type",
    status.HTTP_429_TOO_MANY_REQUESTS: "rate_limited",
}


def _first_error(detail: Any, field: str | None = None) -> tuple[str | None, str]:
    """Reduce DRF's nested validation detail to its first field and message."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = None if key == "non_field_errors" else (key if field is None else f"{field}.{key}")
            return _first_error(value, name)
    if isinstance(detail, list) and detail:
        return _first_error(detail[0], field)
    return field, str(detail)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ApiError):
        return Response(exc.body(), status=exc.status_code, headers=exc.headers)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        field, message = _first_error(exc.detail)
        if field and not message.startswith(field):
            message = f"{field}: {message}"
    else:
        field, message = None, str(getattr(exc, "detail", exc))
    code = _DRF_CODES.get(response.status_code, "error")
    response.data = {"error": {"code": code, "message": message, "field": field}}
    return response


def not_found(request, exception=None) -> JsonResponse:
    return ApiError(404, "not_found", f"no such endpoint: {request.path}").response()


def server_error(request) -> JsonResponse:
    return ApiError(500, "server_error", "the gateway failed to handle this request; the error is logged").response()
