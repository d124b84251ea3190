"""Hand this process's agents to other gateway processes before it exits.

Agents are sent away one at a time. Each one's node is taken offline and its
running jobs fail over to nodes still connected (here or elsewhere), then its
socket closes with 1001. The next agent goes only after this one is back
online through another process, or after ``reconnect_wait`` seconds, so the
model keeps a replica online throughout when another gateway process exists.
"""

from __future__ import annotations

import asyncio
import logging
import time

from apps.registry import presence
from apps.registry.consumers import AgentConsumer, live_consumers

logger = logging.getLogger(__name__)

REASON = "the gateway process is shutting down"


async def _reconnected(node_id: int, old_channel: str, deadline: float) -> bool:
    """Wait until the node's presence names a channel other than ``old_channel``."""
    while time.monotonic() < deadline:
        channel = await presence.presence_of(node_id)
        if channel is not None and channel != old_channel:
            return True
        await asyncio.sleep(0.05)
    return False


async def drain_agents(timeout: float, reconnect_wait: float = 3.0) -> int:
    """Send every agent connected to this process away; returns how many were sent.

    Takes at most about ``timeout`` seconds; past it, the agents left are
    sent away together without waiting for them to reconnect.
    """
    deadline = time.monotonic() + timeout
    consumers: list[AgentConsumer] = [c for c in live_consumers if not getattr(c, "lost", True)]
    if not consumers:
        return 0
    logger.info("draining %s agent connections before shutdown: nodes %s", len(consumers), [c.node_id for c in consumers])
    for index, consumer in enumerate(consumers):
        if consumer.lost:
            continue  # Its agent left on its own while an earlier one was waited for.
        node_id, channel = consumer.node_id, consumer.channel_name
        try:
            await consumer.go_away(REASON)
        except RuntimeError as exc:
            # uvicorn rejects a close after the socket closed: the agent left
            # at the same moment, which is what the drain wants anyway.
            logger.info("node %s: its socket closed before the drain closed it: %s", node_id, exc)
        except Exception:
            logger.exception("node %s: closing its socket for shutdown failed", node_id)
            continue
        last = index == len(consumers) - 1
        if last or time.monotonic() >= deadline:
            continue
        wait_until = min(deadline, time.monotonic() + reconnect_wait)
        if await _reconnected(node_id, channel, wait_until):
            logger.info("node %s reconnected through another gateway process", node_id)
        else:
            logger.info("node %s did not reconnect elsewhere within %.1f s", node_id, reconnect_wait)
    return len(consumers)


async def close_remaining() -> int:
    """Send away, at once, any agent still connected; for the lifespan shutdown."""
    consumers = [c for c in live_consumers if not getattr(c, "lost", True)]
    results = await asyncio.gather(*(c.go_away(REASON) for c in consumers), return_exceptions=True)
    for consumer, result in zip(consumers, results, strict=True):
        if isinstance(result, Exception):
            logger.error("node %s: closing its socket for shutdown failed: %s", consumer.node_id, result)
    return len(consumers)
