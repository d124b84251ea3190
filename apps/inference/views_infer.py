"""Synchronous inference: an async view that dispatches straight to a node.

A Celery hop here would cost more than every other hop together, so the view
creates the job, sends it to the least busy replica and waits on its process
mailbox. Failover happens while it waits: a lost node's consumer moves the
job at once, and an attempt that runs past ATTEMPT_TIMEOUT is moved from here.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from channels.db import database_sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from apps.accounts.authentication import TokenError, bearer_token, user_for_token
from apps.inference.mailbox import mailbox
from apps.inference.models import Model
from apps.inference import payloads
from apps.inference.services import dispatch
from apps.inference.signature import SignatureError, check_inputs
from apps.registry.models import Node
from gridproto.tensors import TensorFormatError, read_tensor_infos
from gridsite.errors import ApiError

logger = logging.getLogger(__name__)

SAFETENSORS = "application/vnd.safetensors"
ACCEPTED_TYPES = {SAFETENSORS, "application/octet-stream"}

_node_names: dict[int, str] = {}


def _node_name(node_id: int | None) -> str:
    if node_id is None:
        return ""
    if node_id not in _node_names:
        _node_names[node_id] = Node.objects.filter(pk=node_id).values_list("name", flat=True).first() or str(node_id)
    return _node_names[node_id]


def _authorize(request: HttpRequest, model_id: str):
    plain = bearer_token(request.headers.get("Authorization"))
    if plain is None:
        raise ApiError(401, "unauthenticated", "send an API token in the header 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": 'Bearer realm="grid"'})
    try:
        user, _ = user_for_token(plain)
    except TokenError as exc:
        raise ApiError(401, "unauthenticated", exc.message, headers={"WWW-Authenticate": 'Bearer realm="grid"'}) from None
    model = Model.objects.filter(model_id=model_id).first()
    if model is None:
        raise ApiError(404, "not_found", f"model {model_id!r} not found; GET /api/models/ lists the served models")
    if not (model.allow_remote_inference or model.owner_id == user.pk or user.is_staff):
        raise ApiError(403, "forbidden", f"model {model_id!r} does not allow remote inference; only its owner can run it")
    return user, model


def _timeout(request: HttpRequest) -> float:
    raw = request.GET.get("timeout")
    limit = settings.GRID["INFER_TIMEOUT_MAX"]
    if raw is None:
        return settings.GRID["INFER_TIMEOUT"]
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= limit:
        raise ApiError(400, "invalid_input", f"timeout={raw!r} must be a number of seconds above 0 and at most {limit}", "timeout")
    return value


_ERROR_STATUS = {"model_error": 422, "no_replica": 503, "timeout": 504, "attempts_exhausted": 503, "input_expired": 503}


@csrf_exempt
async def infer(request: HttpRequest, model_id: str) -> HttpResponse:
    try:
        return await _infer(request, model_id)
    except ApiError as exc:
        return exc.response()


async def _infer(request: HttpRequest, model_id: str) -> HttpResponse:
    if request.method != "POST":
        raise ApiError(405, "method_not_allowed", f"use POST to run inference, not {request.method}")
    user, model = await database_sync_to_async(_authorize)(request, model_id)
    content_type = request.content_type or ""
    if content_type not in ACCEPTED_TYPES:
        raise ApiError(415, "unsupported_media_type", f"send the inputs as safetensors with Content-Type {SAFETENSORS}, not {content_type or 'none'!r}")
    length = int(request.META.get("CONTENT_LENGTH") or 0)
    limit = settings.GRID["MAX_INFER_BYTES"]
    if length > limit:
        raise ApiError(413, "payload_too_large", f"the request body is {length} bytes; the limit is {limit}: split the dataset into smaller batches", "body")
    timeout = _timeout(request)

    body = request.body
    try:
        tensors = read_tensor_infos(body)
        check_inputs(model.input_signature, tensors)
    except TensorFormatError as exc:
        raise ApiError(400, "invalid_input", str(exc), "body") from None
    except SignatureError as exc:
        raise ApiError(400, "invalid_input", exc.message, exc.field) from None

    box = mailbox()
    reply_channel = await box.open()
    job_id = uuid.uuid4()
    key = str(job_id)
    outcome_future = box.expect(key)
    started = time.monotonic()
    try:
        try:
            await dispatch.start_job(job_id=job_id, model=model, owner_id=user.pk, body=body, timeout=timeout, reply_channel=reply_channel)
        except dispatch.NoReplicaError as exc:
            raise ApiError(503, "no_replica", f"{exc}; check GET /api/models/{model_id}/ for its placements", headers={"Retry-After": "5"}) from None
        message = await _wait(key, outcome_future, started + timeout)
    finally:
        box.forget(key)
    outcome = dispatch.outcome_from_message(message)
    if outcome.status != "succeeded":
        status = _ERROR_STATUS.get(outcome.error_code, 502)
        raise ApiError(status, outcome.error_code or "inference_failed", outcome.error)
    output = outcome.output if outcome.output is not None else await payloads.take_output(key)
    if output is None:
        raise ApiError(503, "result_expired", "the result expired before it could be read; run the request again")
    node_name = await database_sync_to_async(_node_name)(outcome.node_id)
    response = HttpResponse(output, content_type=SAFETENSORS)
    response["X-Grid-Job-Id"] = key
    response["X-Grid-Node"] = node_name
    response["X-Grid-Attempts"] = str(outcome.attempts)
    return response


async def _wait(job_id: str, future: asyncio.Future, deadline: float) -> dict:
    """Wait for the job's outcome, failing it over when an attempt stalls."""
    attempt_timeout = settings.GRID["ATTEMPT_TIMEOUT"]
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=min(remaining, attempt_timeout))
        except TimeoutError:
            await dispatch.fail_over_if_stalled(job_id)
    await dispatch.fail_job(job_id, code="timeout", message="no node answered before the request's timeout")
    try:
        # Either the timeout notice or an answer that won the race is on its way.
        return await asyncio.wait_for(future, timeout=1.0)
    except TimeoutError:
        pass
    return {"status": "failed", "error_code": "timeout", "error": "no node answered before the request's timeout", "node_id": None, "attempts": 0, "output": None}
