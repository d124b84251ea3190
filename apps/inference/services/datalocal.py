"""Run a model where a dataset lives: the node reads its own rows, only predictions return.

The gateway never handles a dataset's rows. It sends the node an
``infer.dataset`` message that names the dataset and the model's hash, and the
node answers with ``infer.result`` (argmax predictions, or raw outputs when the
dataset's manifest allows them) or ``infer.summary`` (class counts and
accuracy). The job is an InferenceJob with ``dataset`` set, so dispatch records
its outcome as for any job, but it never fails over: only its node holds the rows.

The node needs a ready replica of the model first. When it has none and the
model allows remote inference, a replica is placed there: streamed from the
staged upload while that still exists, or copied back from a node that holds
the model (apps.inference.services.relay) and then streamed. When neither is
possible the request gets a 409 that says how to fix it.

NOTE: a model's outputs are computed from the rows, so a model built to copy
its inputs into its outputs would carry rows out. Raw outputs are therefore off
unless the dataset's manifest allows them, but argmax classes and summaries
still carry a little information about each row, and Grid has no per-dataset
access control yet: any token with the infer scope may run any model that
allows remote inference over any dataset.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from django.db import IntegrityError, transaction
from django.utils import timezone
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors

from apps.inference.delivery import send_to_node
from apps.inference.models import InferenceJob, Model, Placement
from apps.inference.services import dispatch, placement, relay
from apps.inference.signature import SignatureError, check_inputs
from apps.registry.models import Dataset, Node
from gridproto.datasets import InputMatchError, match_inputs
from gridproto.tensors import TensorInfo
from gridsite.errors import ApiError

logger = logging.getLogger(__name__)

OUTPUTS = ("argmax", "raw")
# Seconds between checks of a replica being placed for a request.
POLL_SECONDS = 0.2
MAX_SUMMARY_BYTES = 64 * 1024


@dataclass(frozen=True)
class Target:
    """A dataset and the online node that holds it."""

    node_id: int
    node_name: str
    dataset: str
    rows: int


def _nodes_hint(model: Model) -> str:
    return f"GET /api/models/{model.model_id}/nodes/ lists the nodes that hold it"


def _check_fit(model: Model, dataset: Dataset) -> None:
    """Raise a 400 unless the dataset's tensors fit the model's input signature."""
    names = [entry["name"] for entry in model.input_signature]
    prefix = f"dataset {dataset.name!r} does not fit model {model.model_id!r}"
    try:
        mapping = match_inputs(names, dataset.tensors.keys(), dataset.label_tensor)
    except InputMatchError as exc:
        raise ApiError(400, "invalid_input", f"{prefix}: {exc}", "dataset") from None
    infos = {
        name: TensorInfo(name=name, dtype=dataset.tensors[tensor]["dtype"], shape=tuple(dataset.tensors[tensor]["shape"]))
        for name, tensor in mapping.items()
    }
    try:
        check_inputs(model.input_signature, infos)
    except SignatureError as exc:
        raise ApiError(400, "invalid_input", f"{prefix}: {exc.message}", "dataset") from None


def find_target(model: Model, *, node_id: int, dataset: str) -> Target:
    """Return the dataset on an online node if the model can take its tensors.

    Raises a 404 for an unknown dataset, a 503 when its node is not online and
    a 400 when its tensors do not fit the model's inputs.
    """
    row = Dataset.objects.select_related("node").filter(node_id=node_id, name=dataset).first()
    if row is None:
        raise ApiError(
            404, "not_found", f"dataset {dataset!r} not found on node {node_id}; GET /api/search/?tags=... lists datasets and their nodes", "dataset"
        )
    if row.node.status != Node.Status.ONLINE:
        raise ApiError(
            503,
            "node_offline",
            f"node {node_id} ({row.node.name}), which holds dataset {dataset!r}, is {row.node.status}; retry when it is online",
            "node",
            headers={"Retry-After": "5"},
        )
    _check_fit(model, row)
    return Target(node_id=node_id, node_name=row.node.name, dataset=row.name, rows=row.rows)


def _no_replica(model: Model, node_id: int, reason: str) -> ApiError:
    return ApiError(
        409,
        "no_replica",
        f"model {model.model_id!r} has no replica on node {node_id} and {reason}; serve the model with more "
        f"replicas so that the dataset's node gets one, or pick a dataset on a node that holds it ({_nodes_hint(model)})",
        "node",
    )


def request_replica(model: Model, node_id: int) -> bool:
    """Return True when the node holds a ready replica, or else start placing one there.

    A new replica is streamed from the staged upload when it still exists, or
    copied from an online node that holds the model; replica_progress offers
    it once the file is staged. Raises a 409 when the model does not allow
    remote inference or no copy of it is reachable.
    """
    with transaction.atomic():
        # Replicas of the active version only: a rollout's new version is not served yet.
        versions = Placement.objects.filter(model=model, sha256=model.sha256)
        current = versions.select_for_update().filter(node_id=node_id).first()
        if current is not None and current.status == Placement.Status.READY:
            return True
        if current is not None and current.status in placement.ACTIVE:
            return False
        if not model.allow_remote_inference:
            raise _no_replica(model, node_id, "only a model served with allow_remote_inference=True is placed on a dataset's node")
        if not placement.fits(model, Node.objects.get(pk=node_id)):
            raise _no_replica(model, node_id, "the node does not meet the model's device or memory constraints")
        staged = placement.staging_path(model.sha256).exists()
        source = (
            versions.filter(status=Placement.Status.READY, node__status=Node.Status.ONLINE)
            .exclude(node_id=node_id)
            .values_list("node_id", flat=True)
            .first()
        )
        if not staged and source is None:
            raise _no_replica(model, node_id, "no online node holds the model to copy it from")
        try:
            with transaction.atomic():
                if current is None:
                    current = Placement.objects.create(model=model, node_id=node_id, sha256=model.sha256)
                else:
                    current.status, current.error = Placement.Status.PENDING, ""
                    current.save(update_fields=["status", "error", "updated"])
        except IntegrityError:
            # Another request created the placement first; it places the replica.
            return False
        placement_pk = current.pk
    if staged:
        logger.info("model %s: placing a replica on node %s for data-local inference", model.model_id, node_id)
    elif relay.request_relay(model.sha256, source):
        logger.info("model %s: copying it from node %s to place a replica on node %s", model.model_id, source, node_id)
    else:
        placement.mark_failed(placement_pk, f"node {source}, which holds the model, could not be reached to copy it")
    return False


def replica_progress(model: Model, node_id: int) -> tuple[str, str]:
    """Return the status and error of the node's placement of the model.

    Offers a pending placement once the copied file is staged, and fails it
    when the copy failed.
    """
    row = Placement.objects.filter(model=model, node_id=node_id, sha256=model.sha256).values_list("pk", "status", "error").first()
    if row is None:
        return Placement.Status.FAILED, "the placement was removed"
    placement_pk, status, error = row
    if status != Placement.Status.PENDING:
        return status, error
    if placement.staging_path(model.sha256).exists():
        # The conditional update lets only one of several waiting requests offer it.
        claimed = Placement.objects.filter(pk=placement_pk, status=Placement.Status.PENDING).update(status=Placement.Status.TRANSFERRING)
        if claimed:
            placement.offer(placement_pk)
        return Placement.Status.TRANSFERRING, ""
    if relay.relay_state(model.sha256) == "failed":
        error = "copying the model from a node that holds it failed"
        placement.mark_failed(placement_pk, error)
        return Placement.Status.FAILED, error
    return status, error


async def wait_for_replica(model: Model, node_id: int, deadline: float) -> None:
    """Wait until the node's replica is ready; raise 409 when it failed and 504 at ``deadline``."""
    while True:
        status, error = await database_sync_to_async(replica_progress)(model, node_id)
        if status == Placement.Status.READY:
            logger.info("model %s: replica on node %s is ready for data-local inference", model.model_id, node_id)
            return
        if status == Placement.Status.FAILED:
            raise _no_replica(model, node_id, f"placing one there failed: {error}")
        if time.monotonic() >= deadline:
            raise ApiError(
                504,
                "timeout",
                f"a replica of model {model.model_id!r} is still being placed on node {node_id}; retry in a few seconds",
                headers={"Retry-After": "5"},
            )
        await asyncio.sleep(POLL_SECONDS)


def _create_job(*, job_id: uuid.UUID, model: Model, owner_id: int | None, target: Target, reply_channel: str, timeout: float) -> InferenceJob:
    now = timezone.now()
    return InferenceJob.objects.create(
        id=job_id,
        model=model,
        owner_id=owner_id,
        status=InferenceJob.Status.RUNNING,
        node_id=target.node_id,
        attempts=1,
        reply_channel=reply_channel,
        sha256=model.sha256,
        dataset=target.dataset,
        dispatched=now,
        deadline=now + timezone.timedelta(seconds=timeout),
    )


async def start_job(
    *, job_id: uuid.UUID, model: Model, owner_id: int | None, target: Target, aggregate: bool, outputs: str, timeout: float, reply_channel: str
) -> None:
    """Create a running data-local job and send it to the dataset's node.

    The outcome arrives on ``reply_channel`` as for any job (dispatch.finish_job).
    """
    await database_sync_to_async(_create_job)(job_id=job_id, model=model, owner_id=owner_id, target=target, reply_channel=reply_channel, timeout=timeout)
    message = {
        "type": "agent.infer_dataset",
        "job_id": str(job_id),
        "attempt": 1,
        "sha256": model.sha256,
        "dataset": target.dataset,
        "aggregate": aggregate,
        "outputs": outputs,
        "timeout": timeout,
        "reply_channel": reply_channel,
    }
    logger.info("job %s: model %s over dataset %s on node %s (aggregate %s, outputs %s)", job_id, model.model_id, target.dataset, target.node_id, aggregate, outputs)
    if not await send_to_node(target.node_id, message):
        await dispatch.fail_job(str(job_id), code="node_failed", message=f"node {target.node_id} is not connected to the gateway", reply_channel=reply_channel)


def request_message(event: dict[str, Any]) -> dict[str, Any]:
    """Return the ``infer.dataset`` message for the agent from an ``agent.infer_dataset`` event."""
    fields = ("job_id", "attempt", "sha256", "dataset", "aggregate", "outputs", "timeout")
    return {"type": "infer.dataset", **{field: event[field] for field in fields}}


async def finish_summary(message: dict[str, Any], *, node_id: int, reply_channel: str) -> bool:
    """Record an ``infer.summary`` message's summary as the job's output, as JSON bytes."""
    body = json.dumps(message["summary"]).encode()
    elapsed = message.get("elapsed_ms")
    compute_ms = float(elapsed) if isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool) else None
    if len(body) > MAX_SUMMARY_BYTES:
        error = f"the node sent a summary of {len(body)} bytes, over the limit of {MAX_SUMMARY_BYTES}"
        return await dispatch.finish_job(message["job_id"], node_id=node_id, attempt=message["attempt"], reply_channel=reply_channel, error=error, kind="model")
    return await dispatch.finish_job(
        message["job_id"], node_id=node_id, attempt=message["attempt"], reply_channel=reply_channel, output=body, compute_ms=compute_ms
    )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def clean_summary(body: bytes) -> dict[str, Any]:
    """Return the known fields of a node's summary after checking them.

    Raises a 502 when the summary is malformed.
    """
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raw = None
    counts = raw.get("class_counts") if isinstance(raw, dict) else None
    if not (
        isinstance(raw, dict)
        and _count(raw.get("rows"))
        and isinstance(counts, dict)
        and all(isinstance(k, str) and k.isdigit() and _count(v) for k, v in counts.items())
    ):
        raise ApiError(502, "invalid_node_response", "the node sent a malformed summary; check its agent version and log")
    summary: dict[str, Any] = {"rows": raw["rows"], "class_counts": dict(sorted(counts.items(), key=lambda item: int(item[0])))}
    accuracy = raw.get("accuracy")
    if _count(raw.get("correct")) and isinstance(accuracy, (int, float)) and math.isfinite(accuracy):
        summary.update(label_tensor=str(raw.get("label_tensor", ""))[:100], correct=raw["correct"], accuracy=float(accuracy))
    return summary


def decode_predictions(body: bytes) -> list[int]:
    """Return the argmax class per row from a node's safetensors result, or raise a 502."""
    try:
        predictions = load_safetensors(body).get("predictions")
    except SafetensorError:
        predictions = None
    if predictions is None or predictions.ndim != 1 or predictions.dtype.kind not in "iu":
        raise ApiError(502, "invalid_node_response", "the node sent predictions that are not one integer per row; check its agent version and log")
    return predictions.tolist()
