"""Operator actions on models, shared by the dashboard and the Django admin."""

from __future__ import annotations

import logging

from django.db import transaction

from apps.inference.delivery import send_to_node_sync
from apps.inference.models import Model, Placement
from apps.inference.services import placement
from apps.inference.tasks import advance_placement

logger = logging.getLogger(__name__)


def replace_model(*, model_pk: int, actor: str) -> None:
    """Queue a placement pass that tops the model up to its wanted replicas.

    When the pass cannot add the missing replicas, it records why in the
    model's ``placement_error``.
    """
    transaction.on_commit(lambda: advance_placement.delay(model_pk))
    logger.info("model %s re-placement requested by %s", model_pk, actor)


def delete_model(*, model_pk: int, actor: str) -> list[int]:
    """Evict the model from the nodes that store it, then delete its row.

    Deleting the row also deletes its placements and jobs. A node that stores
    the same file for another model keeps it. Returns the ids of the nodes
    whose consumer received the eviction. An agent that missed it evicts the
    file when it next sends hello, because no placement wants that file then.
    """
    model = Model.objects.filter(pk=model_pk).first()
    if model is None:
        logger.info("model %s not deleted by %s: it does not exist", model_pk, actor)
        return []
    # Every version the model has on nodes: the active one and any rollout.
    held = set(
        Placement.objects.filter(model_id=model_pk).values_list("node_id", "sha256")
    )
    shared = set(
        Placement.objects.filter(
            node_id__in={node for node, _ in held}, sha256__in={sha for _, sha in held}
        )
        .exclude(model_id=model_pk)
        .values_list("node_id", "sha256")
    )
    evicted = []
    for node_id, sha256 in sorted(held - shared):
        if send_to_node_sync(node_id, {"type": "agent.evict", "sha256": sha256}):
            evicted.append(node_id)
    model.delete()
    for sha256 in {model.sha256, model.pending_sha256} - {""}:
        placement.release_staging(sha256)
    logger.info(
        "model %s (%s) deleted by %s; evicted from nodes %s, kept on %s for another model",
        model_pk,
        model.model_id,
        actor,
        evicted,
        sorted(node for node, _ in shared),
    )
    return evicted
