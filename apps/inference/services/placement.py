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
from django.db.models import Case, Count, Exists, F, OuterRef, Q, When
from django.utils import timezone

from apps.inference.delivery import send_to_node_sync
from apps.inference.models import Model, Placement
from apps.registry.models import Node
from gridsite.redis import key, sync_client

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


def _readers_key(sha256: str) -> str:
    return key("staging-readers", sha256)


def add_staging_reader(sha256: str) -> None:
    """Keep a staged file while a download streams it (for at most an hour)."""
    client = sync_client()
    client.incr(_readers_key(sha256))
    client.expire(_readers_key(sha256), 3600)


def remove_staging_reader(sha256: str) -> None:
    sync_client().decr(_readers_key(sha256))
    release_staging(sha256)


def release_staging(sha256: str) -> None:
    """Delete a staged upload once no placement or download of that file is in progress."""
    if Placement.objects.filter(sha256=sha256, status__in=ACTIVE).exists():
        return
    if int(sync_client().get(_readers_key(sha256)) or 0) > 0:
        return
    path = staging_path(sha256)
    if path.exists():
        path.unlink(missing_ok=True)
        logger.info("deleted staged upload %s: placement finished", sha256)


def _summary(placements: list[Placement]) -> str:
    failures = [f"{p.node.name}: {p.error}" for p in placements if p.status == Placement.Status.FAILED]
    return "; ".join(failures)


def in_grace(node: Node) -> bool:
    """Whether a node that is not online left less than REPLICA_GRACE seconds ago."""
    if node.status == Node.Status.ONLINE or node.status_changed is None:
        return False
    return (timezone.now() - node.status_changed).total_seconds() < settings.GRID["REPLICA_GRACE"]


def fits(model: Model, node: Node) -> bool:
    """Whether a node meets the model's device and memory constraints."""
    capabilities = node.capabilities or {}
    if model.device and capabilities.get("device") != model.device:
        return False
    return capabilities.get("memory_bytes", 0) >= model.min_memory_bytes


def advance(model_pk: int) -> list[int]:
    """Create placements until the model has its wanted replicas, then offer them.

    Returns the ids of the placements it offered.
    """
    with transaction.atomic():
        model = Model.objects.select_for_update().filter(pk=model_pk).first()
        if model is None:
            return []
        target = model.pending_sha256 or model.sha256
        placements = list(model.placements.filter(sha256=target).select_related("node"))
        ready = [p for p in placements if p.status == Placement.Status.READY and p.node.status == Node.Status.ONLINE]
        # A replica whose node went away less than REPLICA_GRACE ago still
        # counts, so a short blip causes no new transfer.
        away = [p for p in placements if p.status == Placement.Status.READY and p not in ready and in_grace(p.node)]
        active = [p for p in placements if p.status in ACTIVE]
        needed = model.replicas - len(ready) - len(away) - len(active)
        new: list[Placement] = []
        relay_from = None
        if needed > 0:
            tried = {p.node_id for p in placements}
            candidates = [
                node
                for node in Node.objects.filter(status=Node.Status.ONLINE)
                .exclude(pk__in=tried)
                .annotate(held=Count("placements"))
                .order_by("in_flight", "held", "name")
                if fits(model, node)
            ][:needed]
            if staging_path(target).exists():
                new = [Placement.objects.create(model=model, node=node, sha256=target) for node in candidates]
            else:
                # The upload is gone: copy the bytes back from a surviving replica
                # (a draining node still has its file), and the relay's end calls
                # advance again.
                sources = [
                    p
                    for p in placements
                    if p.status == Placement.Status.READY and p.node.status in (Node.Status.ONLINE, Node.Status.DRAINING)
                ]
                if candidates and sources:
                    relay_from = sources[0].node_id
        if relay_from is not None:
            sha256, source = target, relay_from
            transaction.on_commit(lambda: _request_relay(sha256, source))
        elif not new and not active:
            error = ""
            if len(ready) < model.replicas:
                online = Node.objects.filter(status=Node.Status.ONLINE).count()
                reason = f"{len(ready)} of {model.replicas} replicas ready"
                detail = _summary(placements) or f"{online} online nodes, and no other node fits the model's constraints"
                error = f"{reason}; {detail}"
            if error != model.placement_error:
                model.placement_error = error
                model.save(update_fields=["placement_error"])
                if error:
                    logger.warning("model %s placement ended short: %s", model.model_id, error)
            if model.pending_sha256:
                _finish_rollout(model, ready_count=len(ready))
            transaction.on_commit(lambda: release_staging(target))
    offered = []
    for placement in new:
        if offer(placement.pk):
            offered.append(placement.pk)
    return offered


def _request_relay(sha256: str, source_node_id: int) -> None:
    from apps.inference.services.relay import request_relay

    request_relay(sha256, source_node_id)


def _finish_rollout(model: Model, *, ready_count: int) -> None:
    """End a rollout whose transfers are over: switch versions, or keep the old one.

    The new version becomes active when it is ready on at least as many nodes
    as the old one (at most the wanted replicas). The old version keeps
    serving jobs already sent to it; its replicas are retired a little later.
    Called inside advance's transaction, with the model row locked.
    """
    old_ready = Placement.objects.filter(
        model=model, sha256=model.sha256, status=Placement.Status.READY, node__status=Node.Status.ONLINE
    ).count()
    new_sha = model.pending_sha256
    if ready_count >= max(1, min(model.replicas, old_ready)):
        old_sha = model.sha256
        model.sha256, model.size, model.input_signature = new_sha, model.pending_size, model.pending_signature
        logger.info("model %s: version %s is active, replacing %s", model.model_id, new_sha, old_sha)
        transaction.on_commit(lambda: _retire_later(model.pk, old_sha))
    else:
        model.placement_error = f"version {new_sha[:12]} was not rolled out and version {model.sha256[:12]} keeps serving: {model.placement_error}"
        logger.warning("model %s: rollout of %s failed: %s", model.model_id, new_sha, model.placement_error)
        transaction.on_commit(lambda: _retire_later(model.pk, new_sha))
    model.pending_sha256, model.pending_size, model.pending_signature = "", 0, None
    model.save()


def _retire_later(model_pk: int, sha256: str) -> None:
    from apps.inference.tasks import retire_version

    # Jobs already sent to the old version get ATTEMPT_TIMEOUT to finish.
    retire_version.apply_async((model_pk, sha256), countdown=settings.GRID["ATTEMPT_TIMEOUT"])


def retire(model_pk: int, sha256: str) -> int:
    """Evict a version that is neither active nor rolling out from its nodes."""
    model = Model.objects.filter(pk=model_pk).first()
    if model is not None and sha256 in (model.sha256, model.pending_sha256):
        return 0
    holders = list(Placement.objects.filter(model_id=model_pk, sha256=sha256).values_list("node_id", flat=True))
    for node_id in holders:
        if not Placement.objects.filter(node_id=node_id, sha256=sha256).exclude(model_id=model_pk).exists():
            send_to_node_sync(node_id, {"type": "agent.evict", "sha256": sha256})
    Placement.objects.filter(model_id=model_pk, sha256=sha256).delete()
    release_staging(sha256)
    logger.info("model %s: retired version %s from nodes %s", model_pk, sha256, holders)
    return len(holders)


def offer(placement_pk: int) -> bool:
    """Ask the node's consumer to stream the staged file to its agent."""
    placement = Placement.objects.select_related("model", "node").get(pk=placement_pk)
    model = placement.model
    path = staging_path(placement.sha256)
    message = {
        "type": "agent.place",
        "placement_id": placement.pk,
        "model_id": model.model_id,
        "sha256": placement.sha256,
        "size": model.pending_size if placement.sha256 == model.pending_sha256 else model.size,
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


def mark_lost(placement_pk: int, reason: str) -> None:
    updated = Placement.objects.filter(pk=placement_pk, status=Placement.Status.READY).update(status=Placement.Status.FAILED, error=reason)
    if updated:
        logger.warning("placement %s given up: %s", placement_pk, reason)


def models_short_of_replicas() -> list[int]:
    """Models with fewer ready replicas on online nodes than wanted and no transfer running."""
    # Replicas on nodes away for less than REPLICA_GRACE still count.
    recent = timezone.now() - timezone.timedelta(seconds=settings.GRID["REPLICA_GRACE"])
    ready = Count(
        "placements",
        filter=Q(placements__status=Placement.Status.READY, placements__sha256=F("sha256"))
        & (Q(placements__node__status=Node.Status.ONLINE) | Q(placements__node__status_changed__gte=recent)),
    )
    active = Count("placements", filter=Q(placements__status__in=ACTIVE))
    return list(
        Model.objects.annotate(ready=ready, active=active).filter(ready__lt=F("replicas"), ready__gt=0, active=0).values_list("pk", flat=True)
    )


def models_never_placed(*, created_before) -> list[int]:
    """Models created before ``created_before`` with no placement of the version they should serve.

    ``advance`` records a placement error whenever it ends short, so a model
    listed here has neither placements nor a recorded error: its placement
    task never ran to the end. One query.
    """
    target = Case(When(~Q(pending_sha256=""), then=F("pending_sha256")), default=F("sha256"))
    placed = Placement.objects.filter(model=OuterRef("pk"), sha256=OuterRef("target"))
    return list(
        Model.objects.filter(created__lt=created_before, placement_error="")
        .annotate(target=target)
        .exclude(Exists(placed))
        .values_list("pk", flat=True)
    )


def report_ready(node_id: int, sha256: str) -> list[int]:
    """Mark a node's placements of this file ready; returns the affected model ids."""
    placements = Placement.objects.filter(node_id=node_id, sha256=sha256).exclude(status=Placement.Status.READY)
    model_pks = list(placements.values_list("model_id", flat=True))
    placements.update(status=Placement.Status.READY, error="")
    return model_pks


def report_failed(node_id: int, sha256: str, error: str) -> list[int]:
    placements = Placement.objects.filter(node_id=node_id, sha256=sha256, status__in=ACTIVE)
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


def models_with_file(sha256: str) -> list[int]:
    return list(Model.objects.filter(Q(sha256=sha256) | Q(pending_sha256=sha256)).values_list("pk", flat=True))


def _ready_elsewhere(model: Model, sha256: str, node_id: int) -> int:
    return (
        Placement.objects.filter(model=model, sha256=sha256, status=Placement.Status.READY, node__status=Node.Status.ONLINE)
        .exclude(node_id=node_id)
        .count()
    )


def reconcile(node_id: int, held: list[str]) -> tuple[list[str], list[int]]:
    """Compare the files an agent reports with its placements after a (re)connect.

    A replica that was given up while the node was away comes back when the
    model is still short of its wanted replicas; otherwise the returning copy
    is surplus. Returns the hashes the agent should evict (no placement wants
    them) and the ids of models whose ready placement here lost its file.
    """
    placements = list(Placement.objects.filter(node_id=node_id).select_related("model"))
    for placement in placements:
        if (
            placement.status == Placement.Status.FAILED
            and placement.sha256 in held
            and placement.sha256 in (placement.model.sha256, placement.model.pending_sha256)
            and _ready_elsewhere(placement.model, placement.sha256, node_id) < placement.model.replicas
        ):
            placement.status = Placement.Status.READY
            placement.error = ""
            placement.save(update_fields=["status", "error", "updated"])
            logger.info("model %s: node %s returned with its replica; reusing it", placement.model.model_id, node_id)
    wanted = {p.sha256 for p in placements if p.status != Placement.Status.FAILED}
    evict = sorted(set(held) - wanted)
    lost = []
    for placement in placements:
        if placement.status == Placement.Status.READY and placement.sha256 not in held:
            placement.status = Placement.Status.FAILED
            placement.error = "the node no longer holds the model file"
            placement.save(update_fields=["status", "error", "updated"])
            lost.append(placement.model_id)
    return evict, lost
