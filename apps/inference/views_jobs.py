"""Asynchronous inference jobs: POST returns 202 at once, GET polls, the result stays a while.

Nobody waits on a reply channel for these jobs: the node's answer is kept in
Redis for RESULT_TTL seconds, failover still happens when a node is lost, and
the periodic sweep fails any job that passes its deadline, so every accepted
job ends as succeeded or failed with a reason.
"""

from __future__ import annotations

import logging
import uuid

from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from apps.accounts.permissions import READ, authenticate_bearer
from apps.inference import idempotency, payloads
from apps.inference.models import InferenceJob
from apps.inference.services import dispatch
from apps.inference.views_infer import _ERROR_STATUS, SAFETENSORS, _authorize, _node_name, _read_inputs, _timeout
from gridsite.errors import ApiError, method_not_allowed

logger = logging.getLogger(__name__)

FINISHED = (InferenceJob.Status.SUCCEEDED, InferenceJob.Status.FAILED)


def job_json(job: InferenceJob, node_name: str) -> dict:
    data = {
        "job_id": str(job.id),
        "url": f"/api/jobs/{job.id}/",
        "model": job.model.model_id,
        "status": job.status,
        "node": node_name or None,
        "attempts": job.attempts,
        "error_code": job.error_code or None,
        "error": job.error or None,
        "created": job.created.isoformat(),
        "finished": job.finished.isoformat() if job.finished else None,
        "deadline": job.deadline.isoformat(),
    }
    if job.status == InferenceJob.Status.SUCCEEDED:
        data["result_url"] = f"/api/jobs/{job.id}/result/"
    return data


@csrf_exempt
async def create_job(request: HttpRequest) -> HttpResponse:
    try:
        return await _create(request)
    except ApiError as exc:
        return exc.response()


async def _create(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        raise method_not_allowed(request, "POST")
    model_id = request.GET.get("model")
    if not model_id:
        raise ApiError(400, "invalid_input", "model is required: POST /api/jobs/?model=<model_id> with safetensors inputs", "model")
    user, model = await database_sync_to_async(_authorize)(request, model_id)
    body = _read_inputs(request, model)
    timeout = _timeout(request)
    idempotency_key = idempotency.parse_key(request.headers.get("Idempotency-Key"))
    job_id = str(uuid.uuid4())
    if idempotency_key is not None:
        existing = await idempotency.claim(user.pk, idempotency_key, job_id)
        if existing is not None:
            return await _accepted(existing, replay=True)
    try:
        await dispatch.start_job(job_id=uuid.UUID(job_id), model=model, owner_id=user.pk, body=body, timeout=timeout, reply_channel="")
    except (dispatch.NoReplicaError, dispatch.BusyError) as exc:
        if idempotency_key is not None:
            await idempotency.release(user.pk, idempotency_key)
        if isinstance(exc, dispatch.BusyError):
            raise ApiError(429, "busy", f"{exc}; retry after a second", headers={"Retry-After": "1"}) from None
        raise ApiError(503, "no_replica", str(exc), headers={"Retry-After": "5"}) from None
    logger.info("job %s accepted for model %s from user %s", job_id, model_id, user.pk)
    return await _accepted(job_id, replay=False)


async def _accepted(job_id: str, *, replay: bool) -> HttpResponse:
    job = await InferenceJob.objects.select_related("model").filter(pk=job_id).afirst()
    if job is None:
        raise ApiError(409, "conflict", "the Idempotency-Key belongs to a job that no longer exists; use a new key", "Idempotency-Key")
    node_name = await database_sync_to_async(_node_name)(job.node_id)
    response = JsonResponse(job_json(job, node_name), status=200 if replay else 202)
    response["Location"] = f"/api/jobs/{job_id}/"
    return response


def _owned_job(request: HttpRequest, job_id: str) -> InferenceJob:
    if request.method not in ("GET", "HEAD"):
        raise method_not_allowed(request, "GET")
    user, _ = authenticate_bearer(request, READ)
    job = InferenceJob.objects.select_related("model").filter(pk=job_id).first()
    if job is None or (job.owner_id != user.pk and not user.is_staff):
        raise ApiError(404, "not_found", f"job {job_id} not found; jobs are visible to the user who submitted them")
    return job


async def job_detail(request: HttpRequest, job_id: uuid.UUID) -> HttpResponse:
    try:
        job = await database_sync_to_async(_owned_job)(request, str(job_id))
    except ApiError as exc:
        return exc.response()
    node_name = await database_sync_to_async(_node_name)(job.node_id)
    return JsonResponse(job_json(job, node_name))


async def job_result(request: HttpRequest, job_id: uuid.UUID) -> HttpResponse:
    try:
        job = await database_sync_to_async(_owned_job)(request, str(job_id))
        if job.status not in FINISHED:
            raise ApiError(409, "not_finished", f"job {job_id} is {job.status}; poll GET /api/jobs/{job_id}/ until it succeeds", headers={"Retry-After": "1"})
        if job.status == InferenceJob.Status.FAILED:
            raise ApiError(_ERROR_STATUS.get(job.error_code, 502), job.error_code or "inference_failed", job.error)
        output = await payloads.read_output(str(job_id))
        if output is None:
            raise ApiError(410, "result_expired", f"the result of job {job_id} expired; results are kept for a few minutes, so submit the job again")
    except ApiError as exc:
        return exc.response()
    response = HttpResponse(output, content_type=SAFETENSORS)
    response["X-Grid-Job-Id"] = str(job_id)
    return response
