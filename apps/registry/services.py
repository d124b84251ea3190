"""Node enrollment, liveness and the heartbeat flush."""

from __future__ import annotations

import datetime as dt
import logging
from functools import partial
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from apps.accounts.tokens import hash_token
from apps.registry import events, presence
from apps.registry.models import Node

logger = logging.getLogger(__name__)


def offline_after() -> float:
    """Seconds without a heartbeat after which a node counts as offline."""
    return settings.GRID["HEARTBEAT_INTERVAL"] * settings.GRID["HEARTBEAT_MISSES"]


def node_for_token(plain: str) -> Node | None:
    return Node.objects.filter(token_hash=hash_token(plain), token_revoked=False).first()


def mark_online(node_id: int, hello: dict[str, Any]) -> Node:
    now = timezone.now()
    with transaction.atomic():
        node = Node.objects.select_for_update().get(pk=node_id)
        # A draining node stays draining across reconnects: it gets no new work.
        if node.status != Node.Status.DRAINING:
            node.status = Node.Status.ONLINE
        node.connected_since = now
        node.last_heartbeat = now
        node.status_changed = now
        node.protocol_version = hello["protocol"]
        node.capabilities = _clean_capabilities(hello.get("capabilities", {}))
        node.concurrency = max(1, min(int(hello.get("concurrency", 1)), 1024))
        node.in_flight = 0
        node.save()
    # on_commit runs at once outside a transaction; inside one it waits for the commit.
    transaction.on_commit(partial(events.publish_node_status, node.pk, str(node.status)))
    logger.info("node %s (%s) online, protocol %s", node.pk, node.name, node.protocol_version)
    return node


def _clean_capabilities(raw: dict[str, Any]) -> dict[str, Any]:
    """Keep only the known capability fields, as short scalars."""
    clean: dict[str, Any] = {}
    for field in ("torch", "device", "python", "agent_version"):
        if isinstance(raw.get(field), str):
            clean[field] = raw[field][:100]
    for field in ("cpu_count", "memory_bytes", "disk_free_bytes"):
        value = raw.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            clean[field] = value
    return clean


def mark_offline(node_id: int, reason: str, *, connected_before: dt.datetime | None = None) -> bool:
    """Mark a node offline; True when it was online or draining before.

    With ``connected_before``, a node whose agent connected at or after that
    moment is left alone: a sweep that found it silent raced its reconnect.
    """
    now = timezone.now()
    nodes = Node.objects.filter(pk=node_id).exclude(status=Node.Status.OFFLINE)
    if connected_before is not None:
        nodes = nodes.exclude(connected_since__gte=connected_before)
    changed = nodes.update(status=Node.Status.OFFLINE, in_flight=0, status_changed=now)
    if changed:
        transaction.on_commit(partial(events.publish_node_status, node_id, Node.Status.OFFLINE.value))
        logger.info("node %s offline: %s", node_id, reason)
    return bool(changed)


def flush_heartbeats() -> int:
    """Copy the heartbeats held in Redis to the Node rows in one UPDATE."""
    beats = presence.read_heartbeats()
    if not beats:
        return 0
    nodes = list(Node.objects.filter(pk__in=beats.keys()).only("pk", "last_heartbeat", "in_flight"))
    for node in nodes:
        stamp, in_flight = beats[node.pk]
        node.last_heartbeat = dt.datetime.fromtimestamp(stamp, tz=dt.UTC)
        node.in_flight = in_flight
    Node.objects.bulk_update(nodes, ["last_heartbeat", "in_flight"])
    return len(nodes)


def stale_node_ids(now: float) -> list[int]:
    """Nodes shown as connected whose heartbeats stopped.

    Covers nodes whose gateway process died, so no consumer is left to notice.
    A node that connected recently but has no heartbeat yet is given the same
    grace from its connection time.
    """
    beats = presence.read_heartbeats()
    limit = offline_after()
    stale = []
    for node in Node.objects.exclude(status=Node.Status.OFFLINE).only("pk", "connected_since"):
        # The heartbeats were read before the nodes: an agent that reconnected
        # in between has an old heartbeat but a new connection time.
        seen = [beats.get(node.pk, (None, 0))[0]]
        if node.connected_since is not None:
            seen.append(node.connected_since.timestamp())
        last = max((stamp for stamp in seen if stamp is not None), default=None)
        if last is None or now - last > limit:
            stale.append(node.pk)
    return stale
