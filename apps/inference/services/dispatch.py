"""Send inference jobs to nodes, fail them over, and record exactly one outcome.

Every state change is a conditional UPDATE on (status, node, attempts), so when
a late result, a failover and a timeout race, exactly one of them wins and the
others see zero rows updated and stand down. Nothing here waits for an agent:
callers that want the result wait on their reply channel (apps.inference.mailbox).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass

from channels.db import database_sync_to_async
from django.conf import settings
from django.db.models import Count, F, FilteredRelation, Q
from django.utils import timezone

from apps.inference import payloads
from apps.inference.delivery import send_to_channel, send_to_node
from apps.inference.models import InferenceJob, Model, Placement
from apps.registry.models import Node
from gridsite.metrics import FAILOVERS

logger = logging.getLogger(__name__)

# Inputs and outputs up to this size ride inside the layer message; larger ones
# are read from Redis, because a pub/sub subscriber whose output buffer passes
# Redis's client-output-buffer-limit (32 MB by default) is disconnected.
INLINE_BYTES = 256 * 1024

Running = InferenceJob.Status.RUNNING


class NoReplicaError(Exception):
    """No online node holds a ready replica of the model."""


@dataclass(frozen=True)
class Outcome:
    """The outcome a waiting request receives when its job ends."""

    status: str
    error_code: str
    error: str
    node_id: int | None
    attempts: int
    output: bytes | None


def choose_node(model_pk: int, exclude: list[int] | tuple[int, ...] = (), *, with_room: bool = False, sha256: str | None = None) -> int | None:
    """Pick the online node with a ready replica and the fewest jobs running.

    Ties are broken at random so that idle replicas share the work. With
    ``with_room``, only nodes running fewer than their capacity count. Only
    replicas of version ``sha256`` count, by default the active one. One query.
    """
    version = Q(sha256=sha256) if sha256 else Q(sha256=F("model__sha256"))
    rows = list(
        Placement.objects.filter(version, model_id=model_pk, status=Placement.Status.READY, node__status=Node.Status.ONLINE)
        .exclude(node_id__in=list(exclude))
        # A filtered join reads only running jobs through the (node, status)
        # index; a filter inside Count would scan each node's whole job history.
        .annotate(running_jobs=FilteredRelation("node__jobs", condition=Q(node__jobs__status=Running)))
        .annotate(busy=Count("running_jobs"))
        .values_list("node_id", "busy", "node__concurrency")
    )
    if with_room:
        factor = settings.GRID["NODE_QUEUE_FACTOR"]
        rows = [row for row in rows if row[1] < row[2] * factor]
    if not rows:
        return None
    least = min(busy for _, busy, _ in rows)
    return random.choice([node_id for node_id, busy, _ in rows if busy == least])


class BusyError(Exception):
    """Every replica is at capacity and the wait for a free one ran out."""


_waiting = 0


async def _node_with_room(model: Model, exclude: tuple[int, ...], sha256: str) -> int:
    """Wait in a bounded queue until a replica has room; raise if none ever had one.

    A node has room while it runs fewer jobs than its advertised concurrency
    times NODE_QUEUE_FACTOR; the extra slots let the agent batch requests.
    """
    global _waiting
    pick = database_sync_to_async(choose_node)
    node_id = await pick(model.pk, exclude, with_room=True, sha256=sha256)
    if node_id is not None:
        return node_id
    if await pick(model.pk, exclude, sha256=sha256) is None:
        raise NoReplicaError(f"no online node holds a ready replica of model {model.model_id!r}")
    if _waiting >= settings.GRID["QUEUE_MAX"]:
        raise BusyError(f"every replica of model {model.model_id!r} is busy and {_waiting} requests already wait")
    _waiting += 1
    try:
        deadline = time.monotonic() + settings.GRID["QUEUE_WAIT"]
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            node_id = await pick(model.pk, exclude, with_room=True, sha256=sha256)
            if node_id is not None:
                return node_id
    finally:
        _waiting -= 1
    raise BusyError(f"every replica of model {model.model_id!r} stayed busy for {settings.GRID['QUEUE_WAIT']} s")


def _create_job(*, job_id: uuid.UUID, model: Model, sha256: str, owner_id: int | None, node_id: int, reply_channel: str, timeout: float, size: int) -> InferenceJob:
    now = timezone.now()
    return InferenceJob.objects.create(
        id=job_id,
        model=model,
        sha256=sha256,
        owner_id=owner_id,
        status=Running,
        node_id=node_id,
        attempts=1,
        reply_channel=reply_channel,
        input_bytes=size,
        dispatched=now,
        deadline=now + timezone.timedelta(seconds=timeout),
    )


async def _send_attempt(job_id: str, node_id: int, attempt: int, *, sha256: str, timeout: float, reply_channel: str, body: bytes | None) -> bool:
    message = {
        "type": "agent.dispatch",
        "job_id": job_id,
        "attempt": attempt,
        "sha256": sha256,
        "timeout": timeout,
        "reply_channel": reply_channel,
        "body": body if body is not None and len(body) <= INLINE_BYTES else None,
    }
    return await send_to_node(node_id, message)


async def start_job(
    *,
    job_id: uuid.UUID,
    model: Model,
    owner_id: int | None,
    body: bytes,
    timeout: float,
    reply_channel: str,
    exclude: tuple[int, ...] = (),
    sha256: str = "",
) -> InferenceJob:
    """Create a running job on the least busy replica with room and send it there.

    Raises NoReplicaError when no replica is ready and BusyError when all stay
    full; neither creates a job. ``exclude`` keeps the job off those nodes;
    ``sha256`` pins a version (default: the active one).
    """
    sha256 = sha256 or model.sha256
    node_id = await _node_with_room(model, exclude, sha256)
    await payloads.store_input(str(job_id), body, timeout)
    job = await database_sync_to_async(_create_job)(
        job_id=job_id, model=model, sha256=sha256, owner_id=owner_id, node_id=node_id, reply_channel=reply_channel, timeout=timeout, size=len(body)
    )
    if exclude:
        await database_sync_to_async(InferenceJob.objects.filter(pk=job_id).update)(failed_nodes=list(exclude))
    delivered = await _send_attempt(str(job_id), node_id, 1, sha256=sha256, timeout=timeout, reply_channel=reply_channel, body=body)
    if not delivered:
        await redispatch(str(job_id), failed_node_id=node_id, attempt=1, reason="node not reachable")
    return job


def _load_running(job_id: str) -> InferenceJob | None:
    return InferenceJob.objects.select_related("model").filter(pk=job_id, status=Running).first()


def _move_attempt(job_id: str, *, from_node: int, attempt: int, to_node: int, failed_nodes: list[int]) -> bool:
    return bool(
        InferenceJob.objects.filter(pk=job_id, status=Running, node_id=from_node, attempts=attempt).update(
            node_id=to_node, attempts=attempt + 1, failed_nodes=failed_nodes, dispatched=timezone.now()
        )
    )


async def redispatch(job_id: str, *, failed_node_id: int, attempt: int, reason: str) -> None:
    """Move a running job off a node that failed it, or fail the job.

    Does nothing when the job is no longer on that node and attempt, because
    another path (an answer, a timeout, a second failover) has handled it.
    """
    while True:
        job = await database_sync_to_async(_load_running)(job_id)
        if job is None or job.node_id != failed_node_id or job.attempts != attempt:
            return
        if job.dataset:
            # Only this node holds the dataset's rows, so no other node can take the job.
            message = f"node {failed_node_id} failed the job over dataset {job.dataset!r}: {reason}"
            await fail_job(job_id, code="node_failed", message=message, reply_channel=job.reply_channel)
            return
        failed_nodes = sorted({*job.failed_nodes, failed_node_id})
        if job.attempts >= settings.GRID["MAX_ATTEMPTS"]:
            await fail_job(job_id, code="attempts_exhausted", message=f"job failed on {job.attempts} nodes; last error: {reason}", reply_channel=job.reply_channel)
            return
        if job.deadline <= timezone.now():
            await fail_job(job_id, code="timeout", message=f"job passed its deadline; last error: {reason}", reply_channel=job.reply_channel)
            return
        next_node = await database_sync_to_async(choose_node)(job.model_id, failed_nodes, sha256=job.sha256)
        if next_node is None:
            await fail_job(
                job_id,
                code="no_replica",
                message=f"no other ready replica of model {job.model.model_id!r} after node {failed_node_id} failed: {reason}",
                reply_channel=job.reply_channel,
            )
            return
        moved = await database_sync_to_async(_move_attempt)(job_id, from_node=failed_node_id, attempt=attempt, to_node=next_node, failed_nodes=failed_nodes)
        if not moved:
            return
        logger.warning("job %s failover from node %s to node %s (attempt %s): %s", job_id, failed_node_id, next_node, attempt + 1, reason)
        FAILOVERS.inc()
        body = await payloads.load_input(job_id)
        if body is None:
            await fail_job(job_id, code="input_expired", message="the job's input expired before a replica could run it", reply_channel=job.reply_channel)
            return
        remaining = max(0.0, (job.deadline - timezone.now()).total_seconds())
        if await _send_attempt(job_id, next_node, attempt + 1, sha256=job.sha256, timeout=remaining, reply_channel=job.reply_channel, body=body):
            return
        failed_node_id, attempt, reason = next_node, attempt + 1, "node not reachable"


def _finish(job_id: str, *, node_id: int, attempt: int, status: str, code: str, error: str, compute_ms: float | None) -> bool:
    return bool(
        InferenceJob.objects.filter(pk=job_id, status=Running, node_id=node_id, attempts=attempt).update(
            status=status, error_code=code, error=error, compute_ms=compute_ms, finished=timezone.now()
        )
    )


async def finish_job(job_id: str, *, node_id: int, attempt: int, reply_channel: str, output: bytes | None = None, error: str = "", kind: str = "", compute_ms: float | None = None) -> bool:
    """Record a node's answer if it is for the job's current attempt.

    A ``node`` error fails the job over instead. Returns False for a late or
    duplicate answer, which is ignored.
    """
    if output is None and kind != "model":
        await redispatch(job_id, failed_node_id=node_id, attempt=attempt, reason=error or "node error")
        return False
    status = InferenceJob.Status.SUCCEEDED if output is not None else InferenceJob.Status.FAILED
    code = "" if output is not None else "model_error"
    won = await database_sync_to_async(_finish)(job_id, node_id=node_id, attempt=attempt, status=status, code=code, error=error[:4000], compute_ms=compute_ms)
    if not won:
        logger.info("ignored late or duplicate result for job %s attempt %s from node %s", job_id, attempt, node_id)
        return False
    inline = output if output is not None and len(output) <= INLINE_BYTES else None
    if output is not None and inline is None:
        await payloads.store_output(job_id, output)
    delivered = await _notify(reply_channel, job_id, status=status, code=code, error=error, node_id=node_id, attempts=attempt, output=inline)
    if inline is not None:
        # Kept briefly even when delivered, so a retry with the same
        # Idempotency-Key gets the same result; RESULT_TTL when nobody waited.
        ttl = settings.GRID["RESULT_TTL"] if not delivered else settings.GRID["DELIVERED_RESULT_TTL"]
        await payloads.store_output(job_id, inline, ttl=ttl)
    return True


def _fail(job_id: str, code: str, message: str) -> InferenceJob | None:
    updated = InferenceJob.objects.filter(pk=job_id, status__in=[InferenceJob.Status.QUEUED, Running]).update(
        status=InferenceJob.Status.FAILED, error_code=code, error=message[:4000], finished=timezone.now()
    )
    if not updated:
        return None
    return InferenceJob.objects.only("node_id", "attempts").get(pk=job_id)


async def fail_job(job_id: str, *, code: str, message: str, reply_channel: str = "") -> bool:
    job = await database_sync_to_async(_fail)(job_id, code, message)
    if job is None:
        return False
    logger.warning("job %s failed (%s): %s", job_id, code, message)
    await payloads.drop_input(job_id)
    await _notify(reply_channel, job_id, status=InferenceJob.Status.FAILED, code=code, error=message, node_id=job.node_id, attempts=job.attempts, output=None)
    return True


async def _notify(reply_channel: str, job_id: str, *, status: str, code: str, error: str, node_id: int | None, attempts: int, output: bytes | None) -> bool:
    """Tell the waiting request how its job ended; True when it was listening."""
    if not reply_channel:
        return False
    return await send_to_channel(
        reply_channel,
        {
            "type": "job.done",
            "job_id": job_id,
            "status": status,
            "error_code": code,
            "error": error,
            "node_id": node_id,
            "attempts": attempts,
            "output": output,
        },
    )


def _stalled_attempt(job_id: str) -> tuple[int, int] | None:
    # A data-local job (dataset set) may run long over many rows and cannot
    # move, so only its deadline bounds it.
    job = InferenceJob.objects.filter(pk=job_id, status=Running, dataset="").values_list("node_id", "attempts", "dispatched").first()
    if job is None:
        return None
    node_id, attempts, dispatched = job
    if dispatched and (timezone.now() - dispatched).total_seconds() >= settings.GRID["ATTEMPT_TIMEOUT"]:
        return node_id, attempts
    return None


async def fail_over_if_stalled(job_id: str) -> None:
    """Move a job whose current attempt has run past ATTEMPT_TIMEOUT."""
    stalled = await database_sync_to_async(_stalled_attempt)(job_id)
    if stalled is not None:
        node_id, attempt = stalled
        await redispatch(job_id, failed_node_id=node_id, attempt=attempt, reason=f"no answer within {settings.GRID['ATTEMPT_TIMEOUT']} s")


def _running_on(node_id: int) -> list[tuple[str, int]]:
    return [(str(pk), attempts) for pk, attempts in InferenceJob.objects.filter(node_id=node_id, status=Running).values_list("pk", "attempts")]


async def fail_over_node(node_id: int, reason: str) -> int:
    """Move every job running on a lost node to another replica; returns the count."""
    jobs = await database_sync_to_async(_running_on)(node_id)
    for job_id, attempt in jobs:
        await redispatch(job_id, failed_node_id=node_id, attempt=attempt, reason=reason)
    if jobs:
        logger.warning("node %s lost with %s jobs running; failed them over: %s", node_id, len(jobs), reason)
    return len(jobs)


def outcome_from_message(message: dict) -> Outcome:
    return Outcome(
        status=message["status"],
        error_code=message.get("error_code", ""),
        error=message.get("error", ""),
        node_id=message.get("node_id"),
        attempts=message.get("attempts", 0),
        output=message.get("output"),
    )
