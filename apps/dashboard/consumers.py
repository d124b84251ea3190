"""The browsers' websocket: pushes node status changes to open dashboards.

Every socket joins the dashboard group; apps.registry.events publishes to it
after a node's status is committed. The socket only receives.
"""

from __future__ import annotations

import logging
from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from apps.registry.events import DASHBOARD_GROUP

logger = logging.getLogger(__name__)

STATUSES = {"online", "offline", "draining"}


class DashboardConsumer(AsyncJsonWebsocketConsumer):
    """One browser's socket. It needs a logged-in session, which AuthMiddlewareStack puts in scope["user"]."""

    joined = False

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            logger.info("rejected dashboard socket without a logged-in session")
            await self.close()
            return
        await self.channel_layer.group_add(DASHBOARD_GROUP, self.channel_name)
        self.joined = True
        await self.accept()
        logger.info("dashboard socket opened by user %s", user.pk)

    async def disconnect(self, code: int) -> None:
        if self.joined:
            await self.channel_layer.group_discard(DASHBOARD_GROUP, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        # Browsers have nothing to send; ignore rather than close, so a stray
        # message from an extension does not cut the live updates.
        return

    async def node_status(self, event: dict[str, Any]) -> None:
        if event.get("status") not in STATUSES or not isinstance(
            event.get("node_id"), int
        ):
            logger.warning("ignored malformed node.status event %r", event)
            return
        await self.send_json(
            {
                "type": "node.status",
                "node_id": event["node_id"],
                "status": event["status"],
                "at": event.get("at"),
            }
        )
