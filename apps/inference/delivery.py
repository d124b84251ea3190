"""Send Channels-layer messages to a node's consumer and know if anyone got them.

The pub/sub channel layer drops a message when nobody subscribes to its
channel, and its ``send`` does not say so. Publishing the serialized message
directly returns Redis's receiver count, so a send to a consumer that is gone
is detected and the work is rerouted instead of waiting for a timeout.
"""

from __future__ import annotations

import logging
from typing import Any

from channels.layers import get_channel_layer

from apps.registry import presence
from gridsite.redis import async_client, sync_client

logger = logging.getLogger(__name__)


async def send_to_channel(channel: str, message: dict[str, Any]) -> bool:
    """Publish a layer message; True when at least one consumer received it."""
    layer = get_channel_layer()
    receivers = await async_client().publish(channel, layer.serialize(message))
    return receivers > 0


async def send_to_node(node_id: int, message: dict[str, Any]) -> bool:
    """Send a layer message to the consumer holding the node's socket."""
    channel = await presence.presence_of(node_id)
    if channel is None:
        logger.info("node %s has no connected socket; %s not delivered", node_id, message.get("type"))
        return False
    delivered = await send_to_channel(channel, message)
    if not delivered:
        logger.warning("node %s: %s reached no consumer on %s", node_id, message.get("type"), channel)
    return delivered


def send_to_node_sync(node_id: int, message: dict[str, Any]) -> bool:
    """Like send_to_node, for sync code such as Celery tasks, without an event loop."""
    channel = presence.presence_of_sync(node_id)
    if channel is None:
        logger.info("node %s has no connected socket; %s not delivered", node_id, message.get("type"))
        return False
    delivered = sync_client().publish(channel, get_channel_layer().serialize(message)) > 0
    if not delivered:
        logger.warning("node %s: %s reached no consumer on %s", node_id, message.get("type"), channel)
    return delivered
