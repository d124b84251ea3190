"""Data-local inference: run a model over a dataset on the node that holds it.

``POST /api/models/{model_id}/infer-dataset/`` with JSON
``{"node": 3, "dataset": "digits-test-1", "aggregate": false, "outputs": "argmax"}``
returns ``{"predictions": [...]}`` (the argmax class of each row), the raw
outputs as safetensors with ``"outputs": "raw"``, or ``{"summary": {...}}``
with ``"aggregate": true``. The rows never reach the gateway; see
apps.inference.services.datalocal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from apps.inference import payloads, views_infer
from apps.inference.mailbox import mailbox
from apps.inference.services import datalocal, dispatch
from gridproto.datasets import NAME_RULE, is_name
from gridsite.errors import ApiError, method_not_allowed

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
EXAMPLE = '{"node": 3, "dataset": "digits-test-1", "aggregate": true}'

_ERROR_STATUS = {"model_error": 422, "node_failed": 503, "timeout": 504}


@dataclass(frozen=True)
class DatasetRequest:
    node: int
    dataset: str
    aggregate: bool
    outputs: str


def parse_request(request: HttpRequest) -> DatasetRequest:
    """Read the JSON body, raising a 400 that names the field at fault."""
    if (request.content_type or "") != "application/json":
        raise ApiError(415, "unsupported_media_type", f"send a JSON body with Content-Type application/json, such as {EXAMPLE}")
    if int(request.META.get("CONTENT_LENGTH") or 0) > MAX_BODY_BYTES:
        raise ApiError(413, "payload_too_large", f"the request body is over {MAX_BODY_BYTES} bytes; send only {EXAMPLE}", "body")
    try:
        body: Any = json.loads(request.body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ApiError(400, "invalid_input", f"the body is not valid JSON; send an object such as {EXAMPLE}", "body") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_input", f"the body must be a JSON object such as {EXAMPLE}", "body")
    node, dataset = body.get("node"), body.get("dataset")
    if not isinstance(node, int) or isinstance(node, bool):
        raise ApiError(400, "invalid_input", f"node must be the integer id of the dataset's node, as in a search result, got {node!r}", "node")
    if not is_name(dataset):
        raise ApiError(400, "invalid_input", f"dataset must be a dataset name of {NAME_RULE}, got {dataset!r}", "dataset")
    aggregate, outputs = body.get("aggregate", False), body.get("outputs", "argmax")
    if not isinstance(aggregate, bool):
        raise ApiError(400, "invalid_input", f"aggregate must be true or false, got {aggregate!r}", "aggregate")
    if outputs not in datalocal.OUTPUTS:
        raise ApiError(400, "invalid_input", f"outputs must be one of {', '.join(datalocal.OUTPUTS)}, got {outputs!r}", "outputs")
    if aggregate and outputs == "raw":
        raise ApiError(400, "invalid_input", "ask for either a summary (aggregate) or raw outputs, not both", "outputs")
    return DatasetRequest(node=node, dataset=dataset, aggregate=aggregate, outputs=outputs)


@csrf_exempt
async def infer_dataset(request: HttpRequest, model_id: str) -> HttpResponse:
    try:
        return await _infer_dataset(request, model_id)
    except ApiError as exc:
        return exc.response()


async def _infer_dataset(request: HttpRequest, model_id: str) -> HttpResponse:
    if request.method != "POST":
        raise method_not_allowed(request, "POST")
    user, model = await database_sync_to_async(views_infer._authorize)(request, model_id)
    params = parse_request(request)
    timeout = views_infer._timeout(request)
    deadline = time.monotonic() + timeout
    target = await database_sync_to_async(datalocal.find_target)(model, node_id=params.node, dataset=params.dataset)
    if not await database_sync_to_async(datalocal.request_replica)(model, target.node_id):
        await datalocal.wait_for_replica(model, target.node_id, deadline)

    box = mailbox()
    reply_channel = await box.open()
    job_id = uuid.uuid4()
    key = str(job_id)
    future = box.expect(key)
    try:
        await datalocal.start_job(
            job_id=job_id,
            model=model,
            owner_id=user.pk,
            target=target,
            aggregate=params.aggregate,
            outputs=params.outputs,
            timeout=max(0.1, deadline - time.monotonic()),
            reply_channel=reply_channel,
        )
        message = await _wait(key, future, deadline, reply_channel)
    finally:
        box.forget(key)
    outcome = dispatch.outcome_from_message(message)
    if outcome.status != "succeeded":
        raise ApiError(_ERROR_STATUS.get(outcome.error_code, 502), outcome.error_code or "inference_failed", outcome.error)
    output = outcome.output if outcome.output is not None else await payloads.take_output(key)
    if output is None:
        raise ApiError(503, "result_expired", "the result expired before it could be read; run the request again")

    headers = {"X-Grid-Job-Id": key, "X-Grid-Node": target.node_name}
    if params.outputs == "raw":
        return HttpResponse(output, content_type=views_infer.SAFETENSORS, headers=headers)
    answer: dict[str, Any] = {"model_id": model.model_id, "node": target.node_id, "node_name": target.node_name, "dataset": target.dataset, "job_id": key}
    if params.aggregate:
        answer["summary"] = datalocal.clean_summary(output)
    else:
        answer["predictions"] = datalocal.decode_predictions(output)
    return JsonResponse(answer, headers=headers)


async def _wait(job_id: str, future: asyncio.Future, deadline: float, reply_channel: str) -> dict:
    """Wait for the job's outcome until ``deadline``, then fail it as timed out."""
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        pass
    message = "the node did not finish the dataset before the request's timeout; pass a larger ?timeout="
    await dispatch.fail_job(job_id, code="timeout", message=message, reply_channel=reply_channel)
    try:
        # Either the timeout notice or a result that won the race is on its way.
        return await asyncio.wait_for(future, timeout=1.0)
    except TimeoutError:
        return {"status": "failed", "error_code": "timeout", "error": message, "node_id": None, "attempts": 1, "output": None}
