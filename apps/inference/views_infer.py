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
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from apps.accounts.permissions import INFER, authenticate_bearer
from apps.accounts.throttling import check_infer_rate
from apps.inference.mailbox import mailbox
from apps.inference import idempotency, verify
from apps.inference.models import InferenceJob, Model
from apps.inference import payloads
from apps.inference.services import dispatch
from apps.inference.signature import SignatureError, check_inputs
from apps.registry.models import Node
from gridproto.tensors import TensorFormatError, read_tensor_infos
from gridsite import metrics
from gridsite.errors import ApiError, method_not_allowed

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
    user, token = authenticate_bearer(request, INFER)
    check_infer_rate(token)
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


def _resolve_version(request: HttpRequest, model: Model) -> tuple[str, list[dict]]:
    """Return the version a request runs on and its signature: ?version= pins one."""
    raw = request.GET.get("version")
    if raw is None:
        return model.sha256, model.input_signature
    if len(raw) >= 8 and model.sha256.startswith(raw):
        return model.sha256, model.input_signature
    if len(raw) >= 8 and model.pending_sha256.startswith(raw):
        return model.pending_sha256, model.pending_signature
    raise ApiError(
        404,
        "not_found",
        f"version {raw!r} of model {model.model_id!r} not found; pass at least 8 characters of its version or pending_version from GET /api/models/{model.model_id}/",
        "version",
    )


def _read_inputs(request: HttpRequest, model: Model, signature: list[dict] | None = None) -> bytes:
    """Return the request body after checking its type, size and tensors against the signature."""
    content_type = request.content_type or ""
    if content_type not in ACCEPTED_TYPES:
        raise ApiError(415, "unsupported_media_type", f"send the inputs as safetensors with Content-Type {SAFETENSORS}, not {content_type or 'none'!r}")
    length = int(request.META.get("CONTENT_LENGTH") or 0)
    limit = settings.GRID["MAX_INFER_BYTES"]
    if length > limit:
        raise ApiError(413, "payload_too_large", f"the request body is {length} bytes; the limit is {limit}: split the dataset into smaller batches", "body")
    body = request.body
    try:
        tensors = read_tensor_infos(body)
        check_inputs(signature or model.input_signature, tensors)
    except TensorFormatError as exc:
        raise ApiError(400, "invalid_input", str(exc), "body") from None
    except SignatureError as exc:
        raise ApiError(400, "invalid_input", exc.message, exc.field) from None
    return body


_ERROR_STATUS = {"model_error": 422, "no_replica": 503, "timeout": 504, "attempts_exhausted": 503, "input_expired": 503}


@csrf_exempt
async def infer(request: HttpRequest, model_id: str) -> HttpResponse:
    started = time.monotonic()
    try:
        response = await _infer(request, model_id)
    except ApiError as exc:
        response = exc.response()
    metrics.observe_request(model_id, response.status_code, time.monotonic() - started)
    return response


async def _infer(request: HttpRequest, model_id: str) -> HttpResponse:
    if request.method != "POST":
        raise method_not_allowed(request, "POST")
    user, model = await database_sync_to_async(_authorize)(request, model_id)
    sha256, signature = _resolve_version(request, model)
    body = _read_inputs(request, model, signature)
    timeout = _timeout(request)

    idempotency_key = idempotency.parse_key(request.headers.get("Idempotency-Key"))
    verify = _verify_count(request)
    started = time.monotonic()
    job_id = str(uuid.uuid4())
    if idempotency_key is not None:
        existing = await idempotency.claim(user.pk, idempotency_key, job_id)
        if existing is not None:
            outcome = await _await_existing(existing, started + timeout)
            return await _respond(model_id, existing, outcome, sha256=sha256)

    try:
        if verify == 2:
            return await _infer_verified(model, user, body, timeout, job_id, sha256)
        outcome = await _run_job(model, user.pk, body, timeout, job_id, sha256=sha256)
    except ApiError:
        if idempotency_key is not None:
            await idempotency.release(user.pk, idempotency_key)
        raise
    metrics.observe_job(model_id, outcome.status, time.monotonic() - started)
    return await _respond(model_id, job_id, outcome, sha256=sha256)


def _verify_count(request: HttpRequest) -> int:
    raw = request.GET.get("verify", "1")
    if raw not in {"1", "2"}:
        raise ApiError(400, "invalid_input", f"verify={raw!r} must be 1 (one replica) or 2 (two replicas, outputs compared)", "verify")
    return int(raw)


async def _run_job(
    model: Model, owner_id: int, body: bytes, timeout: float, job_id: str, exclude: tuple[int, ...] = (), *, sha256: str
) -> dispatch.Outcome:
    """Dispatch one job and wait for its outcome; raise ApiError when it cannot start."""
    box = mailbox()
    reply_channel = await box.open()
    future = box.expect(job_id)
    started = time.monotonic()
    try:
        try:
            await dispatch.start_job(
                job_id=uuid.UUID(job_id),
                model=model,
                owner_id=owner_id,
                body=body,
                timeout=timeout,
                reply_channel=reply_channel,
                exclude=exclude,
                sha256=sha256,
            )
        except dispatch.NoReplicaError as exc:
            raise ApiError(503, "no_replica", f"{exc}; check GET /api/models/{model.model_id}/ for its placements", headers={"Retry-After": "5"}) from None
        except dispatch.BusyError as exc:
            raise ApiError(429, "busy", f"{exc}; retry after a second or add replicas", headers={"Retry-After": "1"}) from None
        message = await _wait(job_id, future, started + timeout)
    finally:
        box.forget(job_id)
    return dispatch.outcome_from_message(message)


async def _respond(model_id: str, job_id: str, outcome: dispatch.Outcome, verified_by: str = "", *, sha256: str) -> HttpResponse:
    if outcome.status != "succeeded":
        status = _ERROR_STATUS.get(outcome.error_code, 502)
        raise ApiError(status, outcome.error_code or "inference_failed", outcome.error)
    output = outcome.output if outcome.output is not None else await payloads.take_output(job_id)
    if output is None:
        raise ApiError(503, "result_expired", "the result expired before it could be read; run the request again")
    node_name = await database_sync_to_async(_node_name)(outcome.node_id)
    response = HttpResponse(output, content_type=SAFETENSORS)
    response["X-Grid-Job-Id"] = job_id
    response["X-Grid-Node"] = node_name
    response["X-Grid-Attempts"] = str(outcome.attempts)
    response["X-Grid-Model-Version"] = sha256
    if verified_by:
        response["X-Grid-Verified-By"] = verified_by
    return response


async def _infer_verified(model: Model, user, body: bytes, timeout: float, job_id: str, sha256: str) -> HttpResponse:
    """Run the request on two different replicas of one version and compare their outputs."""
    first = await _run_job(model, user.pk, body, timeout, job_id, sha256=sha256)
    if first.status != "succeeded":
        return await _respond(model.model_id, job_id, first, sha256=sha256)
    second_id = str(uuid.uuid4())
    try:
        second = await _run_job(model, user.pk, body, timeout, second_id, exclude=(first.node_id,), sha256=sha256)
    except ApiError as exc:
        if exc.code == "no_replica":
            raise ApiError(503, "no_replica", f"verify=2 needs two ready replicas of model {model.model_id!r}; only one is online", "verify") from None
        raise
    if second.status != "succeeded":
        return await _respond(model.model_id, second_id, second, sha256=sha256)
    outputs = [first.output or await payloads.read_output(job_id), second.output or await payloads.read_output(second_id)]
    if outputs[0] is None or outputs[1] is None:
        raise ApiError(503, "result_expired", "a result expired before verification; run the request again")
    detail = await asyncio.to_thread(verify.compare_outputs, outputs[0], outputs[1])
    names = [await database_sync_to_async(_node_name)(node_id) for node_id in (first.node_id, second.node_id)]
    if detail:
        await database_sync_to_async(verify.record_mismatch)(
            model_id=model.model_id, job_ids=[job_id, second_id], node_ids=[first.node_id, second.node_id], detail=detail
        )
        raise ApiError(409, "verification_mismatch", f"nodes {names[0]} and {names[1]} returned different outputs: {detail}; both nodes' records show it")
    return await _respond(model.model_id, job_id, first, verified_by=",".join(names), sha256=sha256)


async def _await_existing(job_id: str, deadline: float) -> dispatch.Outcome:
    """Wait for a job started by an earlier request with the same Idempotency-Key."""
    while True:
        job = await InferenceJob.objects.filter(pk=job_id).values("status", "error_code", "error", "node_id", "attempts").afirst()
        if job is None:
            raise ApiError(409, "conflict", "the Idempotency-Key belongs to a job that no longer exists; use a new key", "Idempotency-Key")
        if job["status"] in (InferenceJob.Status.SUCCEEDED, InferenceJob.Status.FAILED):
            return dispatch.Outcome(job["status"], job["error_code"], job["error"], job["node_id"], job["attempts"], None)
        if time.monotonic() > deadline:
            raise ApiError(504, "timeout", f"job {job_id} for this Idempotency-Key is still running; retry later", "Idempotency-Key")
        await asyncio.sleep(0.05)


def _finished_message(job_id: str) -> dict | None:
    """Return a finished job's outcome from its row, shaped like a ``job.done`` message.

    The pub/sub layer drops a ``job.done`` sent while Redis restarts, so a
    waiter that heard nothing reads the row. The output, if any, is in Redis.
    """
    done = (InferenceJob.Status.SUCCEEDED, InferenceJob.Status.FAILED)
    row = InferenceJob.objects.filter(pk=job_id, status__in=done).values("status", "error_code", "error", "node_id", "attempts").first()
    return None if row is None else {**row, "output": None}


async def _wait(job_id: str, future: asyncio.Future, deadline: float) -> dict:
    """Wait for the job's outcome, failing it over when an attempt stalls.

    Every ATTEMPT_TIMEOUT without a message, the job's row is read too, so a
    lost ``job.done`` costs at most that long.
    """
    attempt_timeout = settings.GRID["ATTEMPT_TIMEOUT"]
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=min(remaining, attempt_timeout))
        except TimeoutError:
            await dispatch.fail_over_if_stalled(job_id)
            finished = await database_sync_to_async(_finished_message)(job_id)
            if finished is not None:
                logger.warning("job %s ended (%s) but its job.done message never arrived; returning the outcome from its row", job_id, finished["status"])
                return finished
    await dispatch.fail_job(job_id, code="timeout", message="no node answered before the request's timeout")
    try:
        # Either the timeout notice or an answer that won the race is on its way.
        return await asyncio.wait_for(future, timeout=1.0)
    except TimeoutError:
        pass
    finished = await database_sync_to_async(_finished_message)(job_id)
    if finished is not None:
        return finished
    return {"status": "failed", "error_code": "timeout", "error": "no node answered before the request's timeout", "node_id": None, "attempts": 0, "output": None}
