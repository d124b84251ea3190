"""Redis clients for presence, heartbeats and short-lived inference payloads.

One asyncio client per event loop (a client is bound to the loop that created
it) and one process-wide synchronous client for Celery tasks and views.
"""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aioredis
from django.conf import settings

_async_clients: dict[asyncio.AbstractEventLoop, aioredis.Redis] = {}
_sync_client: redis.Redis | None = None


def async_client() -> aioredis.Redis:
    loop = asyncio.get_running_loop()
    # async_to_sync in Celery tasks runs each call on a new loop: drop the
    # clients of loops that have closed, or their connections pile up in Redis.
    for stale in [other for other in _async_clients if other.is_closed()]:
        del _async_clients[stale]
    client = _async_clients.get(loop)
    if client is None:
        client = aioredis.Redis.from_url(settings.REDIS_URL, health_check_interval=30)
        _async_clients[loop] = client
    return client


def sync_client() -> redis.Redis:
    global _sync_client
    if _sync_client is None:
        _sync_client = redis.Redis.from_url(settings.REDIS_URL, health_check_interval=30)
    return _sync_client


def key(*parts: object) -> str:
    """Build a Redis key under this deployment's prefix."""
    return ":".join([settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"], *map(str, parts)])
