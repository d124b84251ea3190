"""Node status events for the operators' dashboard, sent over the Channels layer.

Every open dashboard socket joins ``DASHBOARD_GROUP``
(apps.dashboard.consumers). The pub/sub layer delivers a group message only to
sockets subscribed at that moment, so an event is a hint to refresh, never the
record: the Node row stays the truth.
"""

from __future__ import annotations

import logging
import time

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)

DASHBOARD_GROUP = "dashboard"


def publish_node_status(node_id: int, status: str) -> None:
    """Send ``{"type": "node.status", ...}`` to every open dashboard.

    Call it after the status change is committed, from synchronous code. A
    failed send is logged and swallowed, because a missed push only delays the
    dashboard until its next refresh and must not undo the status change.
    """
    message = {
        "type": "node.status",
        "node_id": node_id,
        "status": status,
        "at": time.time(),
    }
    try:
        async_to_sync(get_channel_layer().group_send)(DASHBOARD_GROUP, message)
    except Exception:
        logger.exception(
            "node %s: could not publish status %s to the dashboard", node_id, status
        )
