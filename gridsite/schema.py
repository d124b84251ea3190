"""Shared pieces of the OpenAPI schema served at /api/schema/.

The per-app modules (apps.inference.schema, apps.registry.schema) describe the
DRF views with these. The inference, job and download endpoints are plain
async Django views, which drf-spectacular does not see, so ``add_plain_views``
adds the paths written by hand in apps.inference.schema_paths.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiExample, OpenApiResponse
from rest_framework import serializers

SAFETENSORS = "application/vnd.safetensors"

DESCRIPTION = """\
Grid hosts PyTorch models on node agents that connect out to this gateway, and
runs inference on them through it. The gateway stores metadata only; model
bytes and tensors pass through it to the nodes.

**Authentication.** Send an API token as `Authorization: Bearer grid_...`.
An operator creates one with `manage.py createtoken USER`; the token is shown
once and stored as a SHA-256 hash. Tokens may expire and may be revoked
(`manage.py revoketoken`). Node tokens (`node_...`) authenticate agents only.

**Scopes.** A token carries some of these scopes: `read` for every GET,
`serve` to upload, change and delete models, `infer` to run inference, and
`admin` to manage nodes, which also needs a staff user. A request without the
scope it needs gets 403 with code `missing_scope`.

**Permissions.** A model's owner (or staff) may change and delete it. Other
users may run inference on it only when it was served with
`allow_remote_inference`, and download it only with `allow_download`.

**Errors.** Every error has the body
`{"error": {"code": "...", "message": "...", "field": "..."}}`, where `code`
is stable, `message` names the value at fault and the fix, and `field` is the
request field at fault or null.

**Rate limits.** Each token may send GRID_THROTTLE_RATE REST requests and
GRID_INFER_THROTTLE_RATE inference requests (600 and 6000 a minute by
default). Over the limit the gateway returns 429 with a `Retry-After` header.

**Client.** The Python package `gridclient` wraps this API:
`gr.GridNetwork(url).run_remote_inference(model_id, dataset)`.
"""


class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.CharField(
        help_text="A stable, machine-readable code such as invalid_input or no_replica."
    )
    message = serializers.CharField(
        help_text="What failed, on which value, and how to fix it."
    )
    field = serializers.CharField(
        allow_null=True, help_text="The request field at fault, or null."
    )


class ErrorSerializer(serializers.Serializer):
    """The body of every error response."""

    error = ErrorDetailSerializer()


# Each error status: its meaning on this API, and the code, message and field
# of an example body.
ERRORS: dict[int, tuple[str, str, str, str | None]] = {
    400: (
        "The request or one of its fields is invalid; `field` names it.",
        "invalid_input",
        "tags is required: pass ?tags=a,b with one or more comma-separated tags",
        "tags",
    ),
    401: (
        "No API token, or an invalid, expired or revoked one.",
        "unauthenticated",
        "send an API token in the header 'Authorization: Bearer <token>'; an operator creates one with `manage.py createtoken USER`",
        None,
    ),
    403: (
        "The token lacks the scope this needs, or its user may not do this.",
        "missing_scope",
        "this API token (grid_Ab12Cd…) lacks the 'serve' scope (it has: read); create a token with it: manage.py createtoken USER --scopes serve,...",
        None,
    ),
    404: (
        "No such model, node or endpoint.",
        "not_found",
        "model 'digits-cnn' not found; GET /api/models/ lists the served models",
        None,
    ),
    405: (
        "The endpoint does not accept this method; the Allow header lists those it does.",
        "method_not_allowed",
        "method PUT is not allowed on /api/models/; use GET, POST",
        None,
    ),
    409: (
        "A model with this model_id exists.",
        "conflict",
        "model 'digits-cnn' already exists; delete it first or choose another model_id",
        "model_id",
    ),
    410: (
        "The result is gone: results are kept for GRID_RESULT_TTL seconds.",
        "result_expired",
        "the result of job 5b0e0c1e-9a7e-4d0b-8c53-0f4b1a7e2d11 expired; results are kept for a few minutes, so submit the job again",
        None,
    ),
    413: (
        "The body is over the limit for this endpoint.",
        "payload_too_large",
        "the request body is 40000000 bytes; the limit is 33554432: split the dataset into smaller batches",
        "body",
    ),
    415: (
        "The body has a Content-Type this endpoint does not accept.",
        "unsupported_media_type",
        "send the inputs as safetensors with Content-Type application/vnd.safetensors, not 'application/json'",
        None,
    ),
    422: (
        "The model raised an error while computing; the same input fails on every replica.",
        "model_error",
        "mat1 and mat2 shapes cannot be multiplied (4x63 and 64x10)",
        None,
    ),
    429: (
        "Too many requests for this token; wait for the seconds in the Retry-After header.",
        "rate_limited",
        "this client sent more than 600 requests per 60 s (GRID_THROTTLE_RATE); retry after 12 s",
        None,
    ),
    502: (
        "A node sent an answer the gateway could not use.",
        "invalid_answer",
        "the node sent predictions that are not one integer per row; check its agent version and log",
        None,
    ),
    503: (
        "No node can serve the request now; retry after the seconds in the Retry-After header.",
        "no_replica",
        "no online node holds a ready replica of model 'digits-cnn'; check GET /api/models/digits-cnn/ for its placements",
        None,
    ),
    504: (
        "No node answered before the request's timeout.",
        "timeout",
        "no node answered before the request's timeout",
        None,
    ),
}

# Every endpoint behind a token can return these: 400 because any URL with a
# NUL character is rejected (gridsite.middleware).
COMMON_ERRORS = (400, 401, 403, 429)


def error_body(status: int) -> dict[str, Any]:
    _, code, message, field = ERRORS[status]
    return {"error": {"code": code, "message": message, "field": field}}


def error_responses(*statuses: int) -> dict[int, OpenApiResponse]:
    """Return the documented error responses for ``statuses`` and COMMON_ERRORS."""
    responses = {}
    for status in sorted(set(statuses) | set(COMMON_ERRORS)):
        description = ERRORS[status][0]
        example = OpenApiExample(
            ERRORS[status][1],
            value=error_body(status),
            response_only=True,
            status_codes=[status],
        )
        responses[status] = OpenApiResponse(
            ErrorSerializer, description=description, examples=[example]
        )
    return responses


def error_refs(*statuses: int) -> dict[str, Any]:
    """Error responses written as raw OpenAPI, for the hand-written paths."""
    responses = {}
    for status in sorted(set(statuses) | set(COMMON_ERRORS)):
        description, code, _, _ = ERRORS[status]
        content = {
            "schema": {"$ref": "#/components/schemas/Error"},
            "examples": {code: {"value": error_body(status)}},
        }
        responses[str(status)] = {
            "description": description,
            "content": {"application/json": content},
        }
    return responses


def _complete_errors(schema: dict[str, Any]) -> None:
    """Document the errors every operation can return, and Retry-After on 429 and 503.

    This also covers endpoints whose own description leaves them out: every
    one of them can return COMMON_ERRORS, and 404 when its path has a
    parameter.
    """
    header = {
        "schema": {"type": "integer", "minimum": 1},
        "description": "Seconds to wait before sending the request again.",
    }
    for path, item in schema.get("paths", {}).items():
        statuses = COMMON_ERRORS + ((404,) if "{" in path else ())
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            for status, response in error_refs(*statuses).items():
                responses.setdefault(status, response)
            for status in ("429", "503"):
                if status in responses:
                    responses[status].setdefault("headers", {})["Retry-After"] = header


def add_plain_views(
    result: dict[str, Any], generator, request, public
) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: add the plain async views, complete the errors.

    Each plain view's path is added only when the URL configuration routes it.
    """
    from django.urls import Resolver404, resolve

    from apps.inference.schema_paths import plain_operations

    paths = result.setdefault("paths", {})
    for path, item in plain_operations().items():
        example = path.replace("{model_id}", "m").replace(
            "{job_id}", "00000000-0000-0000-0000-000000000000"
        )
        try:
            resolve(example)
        except Resolver404:
            continue
        paths[path] = item
    result["paths"] = dict(sorted(paths.items()))
    result.setdefault("info", {})["description"] = DESCRIPTION
    _complete_errors(result)
    return result
