"""Celery tasks: placement and the periodic sweeps that keep state honest.

Tasks take ids, never wait for an agent, and never wait for another task.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

from asgiref.sync import async_to_sync
from celery import shared_task
from django.conf import settings
from django.utils import timezone

from apps.inference.delivery import send_to_node_sync
from apps.inference.models import InferenceJob, Placement
from apps.inference.services import dispatch, placement
from apps.registry import history
from apps.registry import services as registry

logger = logging.getLogger(__name__)


@shared_task
def place_model(model_pk: int) -> list[int]:
    return placement.advance(model_pk)


@shared_task
def advance_placement(model_pk: int) -> list[int]:
    return placement.advance(model_pk)


@shared_task
def retire_version(model_pk: int, sha256: str) -> int:
    return placement.retire(model_pk, sha256)


@shared_task
def sweep_nodes() -> dict[str, int]:
    """Flush heartbeats to PostgreSQL and take nodes whose heartbeats stopped offline.

    A live consumer closes a silent agent itself; this sweep catches nodes
    whose gateway process died, so no consumer is left to do it.
    """
    flushed = registry.flush_heartbeats()
    now = time.time()
    started = timezone.now()
    history.record_samples(now)
    stale = registry.stale_node_ids(now)
    taken = []
    for node_id in stale:
        try:
            # A live consumer owns its node's liveness: it checks its own
            # heartbeat clock and closes the socket if the agent is silent.
            # Marking the node offline behind its back would leave a resumed
            # agent heartbeating on a socket whose node shows offline.
            if send_to_node_sync(node_id, {"type": "agent.heartbeat_check"}):
                continue
            # A node whose agent reconnects during this sweep stays online.
            if node_lost(node_id, "heartbeats stopped and no gateway process holds its socket", connected_before=started):
                taken.append(node_id)
        except Exception:
            logger.exception("sweep could not take node %s offline; retrying next sweep", node_id)
    if taken:
        logger.warning("sweep took %s stale nodes offline: %s", len(taken), taken)
    return {"flushed": flushed, "stale": len(taken)}


def node_lost(node_id: int, reason: str, *, connected_before: dt.datetime | None = None) -> bool:
    """Take a node offline, fail its jobs over and re-place its transfers.

    With ``connected_before``, does nothing and returns False when the node
    is offline already or its agent connected at or after that moment.
    """
    changed = registry.mark_offline(node_id, reason, connected_before=connected_before)
    if connected_before is not None and not changed:
        return False
    async_to_sync(dispatch.fail_over_node)(node_id, reason)
    for model_pk in set(placement.fail_node_transfers(node_id, f"node went offline: {reason}")):
        advance_placement.delay(model_pk)
    return True


@shared_task
def sweep_jobs() -> dict[str, int]:
    """Fail over attempts that ran past ATTEMPT_TIMEOUT and fail jobs past their deadline.

    Keeps every accepted job moving towards succeeded or failed even when the
    process that was waiting for it died.
    """
    now = timezone.now()
    expired = list(InferenceJob.objects.filter(status=InferenceJob.Status.RUNNING, deadline__lt=now).values_list("pk", flat=True)[:500])
    for job_id in expired:
        async_to_sync(dispatch.fail_job)(str(job_id), code="timeout", message="the job passed its deadline before any node answered")
    stalled_before = now - timezone.timedelta(seconds=settings.GRID["ATTEMPT_TIMEOUT"])
    stalled = list(
        InferenceJob.objects.filter(status=InferenceJob.Status.RUNNING, dispatched__lt=stalled_before).values_list("pk", flat=True)[:500]
    )
    for job_id in stalled:
        async_to_sync(dispatch.fail_over_if_stalled)(str(job_id))
    return {"expired": len(expired), "stalled": len(stalled)}


@shared_task
def heal_replicas() -> int:
    """Give up replicas on nodes offline past REPLICA_GRACE and re-create them elsewhere.

    Returns the number of replicas given up. advance() places the new ones,
    relaying the bytes from a surviving replica when the upload is gone.
    """
    cutoff = timezone.now() - timezone.timedelta(seconds=settings.GRID["REPLICA_GRACE"])
    lost = list(
        Placement.objects.filter(status=Placement.Status.READY, node__status="offline", node__status_changed__lt=cutoff)
        .select_related("model", "node")
    )
    for replica in lost:
        placement.mark_lost(replica.pk, f"node {replica.node.name} offline for more than {settings.GRID['REPLICA_GRACE']:.0f} s")
    short = {replica.model_id for replica in lost} | set(placement.models_short_of_replicas())
    for model_pk in short:
        advance_placement.delay(model_pk)
    return len(lost)


@shared_task
def sweep_placements() -> int:
    """Fail transfers that have run past PLACEMENT_TIMEOUT, then re-place them.

    Also starts the placement of models that have none for the version they
    should serve: their placement task was lost, for example with a worker
    that died while running it (tasks are acknowledged when they start).
    """
    limit = timezone.now() - timezone.timedelta(seconds=settings.GRID["PLACEMENT_TIMEOUT"])
    stuck = list(Placement.objects.filter(status__in=placement.ACTIVE, updated__lt=limit).values_list("pk", "model_id"))
    for placement_pk, model_pk in stuck:
        placement.mark_failed(placement_pk, f"transfer did not finish within {settings.GRID['PLACEMENT_TIMEOUT']} s")
        advance_placement.delay(model_pk)
    unplaced = placement.models_never_placed(created_before=limit)
    for model_pk in unplaced:
        logger.warning("model %s has no placement %s s after its upload; starting its placement again", model_pk, settings.GRID["PLACEMENT_TIMEOUT"])
        advance_placement.delay(model_pk)
    return len(stuck) + len(unplaced)
