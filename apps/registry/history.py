"""A bounded recent history of each node's heartbeats and load, in Redis.

The heartbeat sweep (apps.inference.tasks.sweep_nodes) appends one sample per
connected node each time it runs, so agents' heartbeats cause no extra write.
Each node's samples live in one Redis list, newest first, capped at
``MAX_SAMPLES``: at the default sweep interval of 2 s that is the last 10
minutes. A node with no socket gets no samples, so its timeline shows a gap.
"""

from __future__ import annotations

from dataclasses import dataclass

from apps.registry import presence
from gridsite.redis import key, sync_client

MAX_SAMPLES = 300
# A deleted or long-gone node's list expires a day after its last sample.
TTL_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Sample:
    """One sweep's view of a node."""

    at: float  # Unix time of the sweep.
    heartbeat: float  # Unix time of the node's latest heartbeat then.
    in_flight: int

    @property
    def heartbeat_age(self) -> float:
        """Seconds between the latest heartbeat and the sweep."""
        return max(0.0, self.at - self.heartbeat)


def _history_key(node_id: int) -> str:
    return key("history", node_id)


def record_samples(now: float) -> int:
    """Append a sample for every node with a heartbeat in Redis; return the count.

    One pipelined round trip, whatever the number of nodes.
    """
    beats = presence.read_heartbeats()
    if not beats:
        return 0
    pipe = sync_client().pipeline(transaction=False)
    for node_id, (stamp, in_flight) in beats.items():
        name = _history_key(node_id)
        pipe.lpush(name, f"{now:.3f}:{stamp:.3f}:{in_flight}")
        pipe.ltrim(name, 0, MAX_SAMPLES - 1)
        pipe.expire(name, TTL_SECONDS)
    pipe.execute()
    return len(beats)


def read_samples(node_id: int) -> list[Sample]:
    """Return the node's recorded samples, oldest first."""
    samples = []
    for raw in reversed(
        sync_client().lrange(_history_key(node_id), 0, MAX_SAMPLES - 1)
    ):
        at, heartbeat, in_flight = raw.decode().split(":")
        samples.append(Sample(float(at), float(heartbeat), int(in_flight)))
    return samples


def forget_samples(node_id: int) -> None:
    sync_client().delete(_history_key(node_id))
