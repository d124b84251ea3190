"""Stage uploads and place models on nodes.

The gateway keeps an upload in the staging folder only while placements are
pending or transferring; the bytes are deleted as soon as none is left. Every
outcome (ready, failed, node lost) calls ``advance``, which tops the model up
to its wanted replicas on untried online nodes, least loaded first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import IO

from django.conf import settings
from django.db import transaction
from django.db.models import Count

from apps.inference.delivery import send_to_node_sync
from apps.inference.models import Model, Placement
from apps.registry.models import Node

logger = logging.getLogger(__name__)

ACTIVE = [Placement.Status.PENDING, Placement.Status.TRANSFERRING]


def staging_dir() -> Path:
    path = Path(settings.GRID["STAGING_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path


def staging_path(sha256: str) -> Path:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"invalid sha256 {sha256!r}")
    return staging_dir() / f"{sha256}.pt2"


def stage_upload(source: IO[bytes]) -> tuple[str, int, Path]:
    """Copy an upload into the staging folder in chunks; return its hash, size and path."""
    digest = hashlib.sha256()
    size = 0
    fd, temp_name = tempfile.mkstemp(dir=staging_dir(), suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(1024 * 1024):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        sha256 = digest.hexdigest()
        path = staging_path(sha256)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return sha256, size, path


def release_staging(sha256: str) -> None:
    """Delete a staged upload once no placement of that file is in progress."""
    if Placement.objects.filter(model__sha256=sha256, status__in=ACTIVE).exists():
        return
    path = staging_path(sha256)
    if path.exists():
        path.unlink(missing_ok=True)
        logger.info("deleted staged upload %s: placement finished", sha256)


def _summary(placements: list[Placement]) -> str:
    failures = [f"{p.node.name}: {p.error}" for p in placements if p.status == Placement.Status.FAILED]
    return "; ".join(failures)


def advance(model_pk: int) -> list[int]:
    """Create placements until the model has its wanted replicas, then offer them.

    Returns the ids of the placements it offered.
    """
    with transaction.atomic():
        model = Model.objects.select_for_update().filter(pk=model_pk).first()
        if model is None:
            return []
        placements = list(model.placements.select_related("node"))
        ready = [p for p in placements if p.status == Placement.Status.READY and p.node.status == Node.Status.ONLINE]
        active = [p for p in placements if p.status in ACTIVE]
        needed = model.replicas - len(ready) - len(active)
        new: list[Placement] = []
        if needed > 0 and staging_path(model.sha256).exists():
            tried = {p.node_id for p in placements}
            candidates = (
                Node.objects.filter(status=Node.Status.ONLINE)
                .exclude(pk__in=tried)
                .annotate(held=Count("placements"))
                .order_by("in_flight", "held", "name")[:needed]
            )
            new = [Placement.objects.create(model=model, node=node) for node in candidates]
        if not new and not active:
            if len(ready) < model.replicas:
                online = Node.objects.filter(status=Node.Status.ONLINE).count()
                reason = f"{len(ready)} of {model.replicas} replicas ready"
                detail = _summary(placements) or f"{online} online nodes for {model.replicas} replicas"
                model.placement_error = f"{reason}; {detail}"
                logger.warning("model %s placement ended short: %s", model.model_id, model.placement_error)
            else:
                model.placement_error = ""
            model.save(update_fields=["placement_error"])
            sha256 = model.sha256
            transaction.on_commit(lambda: release_staging(sha256))
    offered = []
    for placement in new:
        if offer(placement.pk):
            offered.append(placement.pk)
    return offered


def offer(placement_pk: int) -> bool:
    """Ask the node's consumer to stream the staged file to its agent."""
    placement = Placement.objects.select_related("model", "node").get(pk=placement_pk)
    model = placement.model
    path = staging_path(model.sha256)
    message = {
        "type": "agent.place",
        "placement_id": placement.pk,
        "model_id": model.model_id,
        "sha256": model.sha256,
        "size": model.size,
        "path": str(path),
    }
    if not path.exists():
        mark_failed(placement.pk, "the staged upload is gone; serve the model again")
        return False
    Placement.objects.filter(pk=placement.pk, status=Placement.Status.PENDING).update(status=Placement.Status.TRANSFERRING)
    if send_to_node_sync(placement.node_id, message):
        logger.info("model %s: offered to node %s (%s)", model.model_id, placement.node_id, placement.node.name)
        return True
    mark_failed(placement.pk, "node is not connected")
    from apps.inference.tasks import advance_placement

    advance_placement.delay(model.pk)
    return False


def mark_failed(placement_pk: int, error: str) -> None:
    Placement.objects.filter(pk=placement_pk, status__in=ACTIVE).update(status=Placement.Status.FAILED, error=error[:4000])
    logger.warning("placement %s failed: %s", placement_pk, error)


def report_ready(node_id: int, sha256: str) -> list[int]:
    """Mark a node's placements of this file ready; returns the affected model ids."""
    placements = Placement.objects.filter(node_id=node_id, model__sha256=sha256).exclude(status=Placement.Status.READY)
    model_pks = list(placements.values_list("model_id", flat=True))
    placements.update(status=Placement.Status.READY, error="")
    return model_pks


def report_failed(node_id: int, sha256: str, error: str) -> list[int]:
    placements = Placement.objects.filter(node_id=node_id, model__sha256=sha256, status__in=ACTIVE)
    model_pks = list(placements.values_list("model_id", flat=True))
    placements.update(status=Placement.Status.FAILED, error=error[:4000])
    for pk in model_pks:
        logger.warning("model %s failed to load on node %s: %s", pk, node_id, error)
    return model_pks


def fail_node_transfers(node_id: int, reason: str) -> list[int]:
    placements = Placement.objects.filter(node_id=node_id, status__in=ACTIVE)
    model_pks = list(placements.values_list("model_id", flat=True))
    placements.update(status=Placement.Status.FAILED, error=reason)
    return model_pks


def reconcile(node_id: int, held: list[str]) -> tuple[list[str], list[int]]:
    """Compare the files an agent reports with its placements after a (re)connect.

    Returns the hashes the agent should evict (no placement wants them) and the
    ids of models whose ready placement on this node lost its file.
    """
    placements = list(Placement.objects.filter(node_id=node_id).select_related("model"))
    wanted = {p.model.sha256 for p in placements if p.status != Placement.Status.FAILED}
    evict = sorted(set(held) - wanted)
    lost = []
    for placement in placements:
        if placement.status == Placement.Status.READY and placement.model.sha256 not in held:
            placement.status = Placement.Status.FAILED
            placement.error = "the node no longer holds the model file"
            placement.save(update_fields=["status", "error", "updated"])
            lost.append(placement.model_id)
    return evict, lost
