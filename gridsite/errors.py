"""One JSON error shape for every API response:

    {"error": {"code": "invalid_input", "message": "...", "field": "input"}}

``ApiError`` carries it from services and views; ``exception_handler`` turns
DRF's own exceptions into the same shape, and the ``handler*`` views below do
so for the errors Django handles itself (unknown paths, oversized bodies) on
/api/ paths. Other paths keep Django's default pages for the dashboard.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.response import Response

API_PREFIX = "/api/"


class ApiError(Exception):
    """An error response: HTTP status, stable ``code``, a message naming the fix.

    ``field`` names the request field at fault, or None; ``headers`` are added
    to the response (Retry-After, WWW-Authenticate).
    """

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {"code": self.code, "message": self.message, "field": self.field}
        }

    def response(self) -> JsonResponse:
        response = JsonResponse(self.body(), status=self.status_code)
        for name, value in self.headers.items():
            response[name] = value
        return response


def method_not_allowed(request: HttpRequest, *allowed: str) -> ApiError:
    """Return the 405 error for a plain view, with the Allow header RFC 9110 requires."""
    methods = ", ".join(allowed)
    return ApiError(
        405,
        "method_not_allowed",
        f"method {request.method} is not allowed on {request.path}; use {methods}",
        headers={"Allow": methods},
    )


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

NO_TOKEN_MESSAGE = (
    "send an API token in the header 'Authorization: Bearer <token>'; "
    "an operator creates one with `manage.py createtoken USER`"
)


def _first_error(detail: Any, field: str | None = None) -> tuple[str | None, str]:
    """Reduce DRF's nested validation detail to its first field and message."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = (
                None
                if key == "non_field_errors"
                else (key if field is None else f"{field}.{key}")
            )
            return _first_error(value, name)
    if isinstance(detail, list) and detail:
        return _first_error(detail[0], field)
    return field, str(detail)


def _message(
    exc: exceptions.APIException, context: dict[str, Any]
) -> tuple[str | None, str]:
    """Return the field and the message for one of DRF's exceptions."""
    if isinstance(exc, exceptions.ValidationError):
        field, message = _first_error(exc.detail)
        if field and not message.startswith(field):
            message = f"{field}: {message}"
        return field, message
    request = context.get("request")
    if isinstance(exc, exceptions.NotAuthenticated):
        return None, NO_TOKEN_MESSAGE
    if isinstance(exc, exceptions.MethodNotAllowed) and request is not None:
        view = context.get("view")
        allowed = ", ".join(
            m
            for m in getattr(view, "allowed_methods", [])
            if m not in ("HEAD", "OPTIONS")
        )
        return (
            None,
            f"method {request.method} is not allowed on {request.path}; use {allowed}",
        )
    if isinstance(exc, exceptions.Throttled):
        rate = settings.GRID["THROTTLE_RATE"]
        limit = f"more than {rate[0]} requests per {rate[1]} s " if rate else ""
        return (
            None,
            f"this client sent {limit}(GRID_THROTTLE_RATE); retry after {exc.wait or 1:.0f} s",
        )
    if isinstance(exc, exceptions.ParseError):
        return (
            None,
            f"the request body could not be parsed: {exc.detail}; send a well-formed body (/api/docs/ lists each media type)",
        )
    if isinstance(exc, exceptions.UnsupportedMediaType) and request is not None:
        return (
            None,
            f"{exc.detail} on {request.path}; see /api/docs/ for the media types it accepts",
        )
    return None, str(getattr(exc, "detail", exc))


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ApiError):
        return Response(exc.body(), status=exc.status_code, headers=exc.headers)
    # Imported here: rest_framework.views loads the permission classes, which
    # import this module.
    from rest_framework.views import exception_handler as drf_exception_handler

    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.Throttled) and exc.wait:
        # DRF truncates the wait; a Retry-After of 0 would invite an instant retry.
        response["Retry-After"] = str(max(1, round(exc.wait)))
    field, message = (
        _message(exc, context)
        if isinstance(exc, exceptions.APIException)
        else (None, str(exc))
    )
    code = _DRF_CODES.get(response.status_code, "error")
    response.data = {"error": {"code": code, "message": message, "field": field}}
    return response


def is_api(request: HttpRequest) -> bool:
    return request.path.startswith(API_PREFIX)


def bad_request(
    request: HttpRequest, exception: Exception | None = None
) -> HttpResponse:
    """Handle what Django rejects as a SuspiciousOperation, such as an oversized body.

    Django calls this also when a view's parser raised the error.
    """
    if not is_api(request):
        return defaults.bad_request(request, exception)
    if isinstance(exception, RequestDataTooBig):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        message = (
            f"the request body is over {limit} bytes (DATA_UPLOAD_MAX_MEMORY_SIZE); "
            "send a smaller body, or split an inference dataset into batches"
        )
        return ApiError(413, "payload_too_large", message, "body").response()
    if isinstance(exception, TooManyFieldsSent):
        limit = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
        return ApiError(
            400,
            "invalid_input",
            f"the request has over {limit} form fields; send fewer",
        ).response()
    return ApiError(
        400, "invalid_input", f"the request to {request.path} is malformed: {exception}"
    ).response()


def permission_denied(
    request: HttpRequest, exception: Exception | None = None
) -> HttpResponse:
    if not is_api(request):
        return defaults.permission_denied(request, exception)
    return ApiError(
        403, "forbidden", f"access to {request.path} is denied: {exception}"
    ).response()


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if not is_api(request):
        return defaults.page_not_found(request, exception)
    return ApiError(
        404,
        "not_found",
        f"no such endpoint: {request.path}; /api/docs/ lists the endpoints",
    ).response()


def server_error(request: HttpRequest) -> HttpResponse:
    if not is_api(request):
        return defaults.server_error(request)
    return ApiError(
        500,
        "server_error",
        "the gateway failed to handle this request; the error is logged",
    ).response()
