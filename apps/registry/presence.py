"""Where each connected node's socket lives, and its latest heartbeat, in Redis.

A node's consumer registers its channel name here when the agent says hello,
so any gateway process can reach the node. Heartbeats go to a Redis hash, not
PostgreSQL: a periodic task flushes them to the Node rows in one statement.
"""

from __future__ import annotations

import time

from gridsite.redis import async_client, key, sync_client

# Delete the presence key only when it still names this channel, so a closing
# old connection cannot erase the entry of the newer one that replaced it.
_CLEAR_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    redis.call('HDEL', KEYS[2], ARGV[2])
    return 1
end
return 0
"""


def _presence_key(node_id: int) -> str:
    return key("presence", node_id)


def _heartbeats_key() -> str:
    return key("heartbeats")


async def claim_presence(node_id: int, channel: str) -> str | None:
    """Register ``channel`` as the node's socket and return the one it replaced."""
    old = await async_client().set(_presence_key(node_id), channel, get=True)
    return old.decode() if old else None


async def release_presence(node_id: int, channel: str) -> bool:
    """Forget the node's socket if ``channel`` still owns it; True when it did."""
    released = await async_client().eval(_CLEAR_IF_OWNER, 2, _presence_key(node_id), _heartbeats_key(), channel, node_id)
    return bool(released)


async def presence_of(node_id: int) -> str | None:
    value = await async_client().get(_presence_key(node_id))
    return value.decode() if value else None


def presence_of_sync(node_id: int) -> str | None:
    value = sync_client().get(_presence_key(node_id))
    return value.decode() if value else None


async def record_heartbeat(node_id: int, in_flight: int, at: float | None = None) -> None:
    stamp = time.time() if at is None else at
    await async_client().hset(_heartbeats_key(), str(node_id), f"{stamp:.3f}:{in_flight}")


async def record_live_heartbeat(node_id: int, channel: str, in_flight: int) -> bool:
    """Record a heartbeat and register ``channel`` again if no socket is registered.

    Redis keeps no data across a restart, so after one the presence key of a
    node whose socket stayed open is gone, and no process could reach the
    node. SET NX restores it without taking the key from a newer socket.
    One round trip; returns True when the key had to be restored.
    """
    async with async_client().pipeline(transaction=False) as pipe:
        pipe.hset(_heartbeats_key(), str(node_id), f"{time.time():.3f}:{in_flight}")
        pipe.set(_presence_key(node_id), channel, nx=True)
        _, restored = await pipe.execute()
    return bool(restored)


def read_heartbeats() -> dict[int, tuple[float, int]]:
    """Return node id -> (last heartbeat as a Unix time, in-flight requests)."""
    beats: dict[int, tuple[float, int]] = {}
    for node_id, value in sync_client().hgetall(_heartbeats_key()).items():
        stamp, _, in_flight = value.decode().partition(":")
        beats[int(node_id)] = (float(stamp), int(in_flight or 0))
    return beats


def forget_heartbeat(node_id: int) -> None:
    sync_client().hdel(_heartbeats_key(), str(node_id))
