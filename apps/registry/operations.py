"""Operator actions on nodes, shared by the dashboard and the Django admin.

Each action is a conditional update or a message to the node's consumer, so
two operators acting on the same node at once cannot leave it half changed.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from apps.inference.delivery import send_to_node_sync
from apps.inference.models import Placement
from apps.inference.tasks import advance_placement, node_lost
from apps.registry import events, presence, services
from apps.registry.models import Node

logger = logging.getLogger(__name__)

DEFAULT_REASON = "disconnected by an operator"


def drain_node(*, node_id: int, actor: str) -> bool:
    """Stop sending new work to an online node; return True when it was online.

    Dispatch and placement pick only online nodes, so running jobs finish and
    nothing new arrives. The node's models are re-placed elsewhere, because
    replicas on a draining node no longer count towards a model's replicas.
    """
    with transaction.atomic():
        changed = Node.objects.filter(pk=node_id, status=Node.Status.ONLINE).update(
            status=Node.Status.DRAINING, status_changed=timezone.now()
        )
        if not changed:
            logger.info("node %s not drained by %s: it is not online", node_id, actor)
            return False
        model_pks = set(
            Placement.objects.filter(node_id=node_id).values_list("model_id", flat=True)
        )
        transaction.on_commit(
            lambda: events.publish_node_status(node_id, Node.Status.DRAINING.value)
        )
        for model_pk in model_pks:
            transaction.on_commit(lambda pk=model_pk: advance_placement.delay(pk))
    logger.info(
        "node %s draining, requested by %s; re-placing %s models",
        node_id,
        actor,
        len(model_pks),
    )
    return True


def resume_node(*, node_id: int, actor: str) -> bool:
    """Return a draining node to service; return True when it was draining.

    The node becomes online when its agent is connected, and offline otherwise.
    """
    connected = presence.presence_of_sync(node_id) is not None
    status = Node.Status.ONLINE if connected else Node.Status.OFFLINE
    with transaction.atomic():
        changed = Node.objects.filter(pk=node_id, status=Node.Status.DRAINING).update(
            status=status, status_changed=timezone.now()
        )
        if changed:
            transaction.on_commit(
                lambda: events.publish_node_status(node_id, status.value)
            )
    if changed:
        logger.info(
            "node %s resumed as %s, requested by %s", node_id, status.value, actor
        )
    else:
        logger.info("node %s not resumed by %s: it is not draining", node_id, actor)
    return bool(changed)


def disconnect_node(*, node_id: int, actor: str, reason: str = DEFAULT_REASON) -> bool:
    """Ask the node's agent to disconnect and mark the node offline.

    Returns True when the node's consumer received the request. The agent stops
    and does not reconnect. When no consumer received it, this process also
    fails the node's jobs over and re-places its transfers, which the consumer
    would otherwise do.
    """
    delivered = send_to_node_sync(
        node_id, {"type": "agent.disconnect", "reason": reason}
    )
    if delivered:
        services.mark_offline(node_id, reason)
    else:
        node_lost(node_id, reason)
    logger.info(
        "node %s disconnect requested by %s (delivered: %s)", node_id, actor, delivered
    )
    return delivered


def disconnect_all(*, actor: str, reason: str = DEFAULT_REASON) -> int:
    """Disconnect every node that is not offline; return how many were asked."""
    node_ids = list(
        Node.objects.exclude(status=Node.Status.OFFLINE).values_list("pk", flat=True)
    )
    for node_id in node_ids:
        disconnect_node(node_id=node_id, actor=actor, reason=reason)
    logger.info(
        "disconnect of all %s connected nodes requested by %s", len(node_ids), actor
    )
    return len(node_ids)
