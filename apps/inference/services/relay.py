"""Copy a model from a node that holds it back into the staging folder.

The gateway keeps no weights at rest, so re-creating a lost replica or serving
a download needs the bytes of a surviving replica. The source agent streams
them over its own websocket (``model.upload`` / ``model.data``), and its
consumer writes them to ``<sha256>.relay`` in the staging folder, then checks
the hash and renames the file to ``<sha256>.pt2``. From there the usual
placement path streams it to new nodes, and the file is deleted once no
placement needs it. Memory stays flat: each chunk goes straight to disk, and
websocket backpressure paces the agent.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from apps.inference.delivery import send_to_node_sync
from apps.inference.services.placement import staging_path
from gridsite.redis import key, sync_client

logger = logging.getLogger(__name__)

# Seconds a relay may take before another one for the same file may start.
RELAY_LOCK_SECONDS = 600


def relay_path(sha256: str) -> Path:
    return staging_path(sha256).with_suffix(".relay")


def _lock_key(sha256: str) -> str:
    return key("relay", sha256)


def request_relay(sha256: str, source_node_id: int) -> bool:
    """Ask a node to upload a model unless a relay of it is already running."""
    if staging_path(sha256).exists():
        return True
    if not sync_client().set(_lock_key(sha256), source_node_id, nx=True, ex=RELAY_LOCK_SECONDS):
        return True
    relay_path(sha256).unlink(missing_ok=True)
    if send_to_node_sync(source_node_id, {"type": "agent.upload", "sha256": sha256}):
        logger.info("model %s: relay requested from node %s", sha256, source_node_id)
        return True
    sync_client().delete(_lock_key(sha256))
    return False


def relay_failed(sha256: str, reason: str) -> None:
    relay_path(sha256).unlink(missing_ok=True)
    sync_client().set(_lock_key(sha256), "failed", ex=30)
    logger.warning("model %s: relay failed: %s", sha256, reason)


def relay_state(sha256: str) -> str | None:
    value = sync_client().get(_lock_key(sha256))
    return value.decode() if value else None


class RelayWriter:
    """Write one incoming relay to disk, checking offsets and the final hash."""

    def __init__(self, sha256: str, node_id: int):
        self.sha256 = sha256
        self.node_id = node_id
        self.path = relay_path(sha256)
        self.digest = hashlib.sha256()
        self.offset = 0
        self.file = self.path.open("wb")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset != self.offset:
            raise ValueError(f"chunk at offset {offset}, expected {self.offset}")
        self.file.write(data)
        self.digest.update(data)
        self.offset += len(data)

    def finish(self) -> bool:
        """Close the file; keep it as the staged copy only if the hash matches."""
        self.file.close()
        if self.digest.hexdigest() != self.sha256:
            relay_failed(self.sha256, f"sha256 mismatch from node {self.node_id}: got {self.digest.hexdigest()}")
            return False
        os.replace(self.path, staging_path(self.sha256))
        sync_client().delete(_lock_key(self.sha256))
        logger.info("model %s: relayed %d bytes from node %s", self.sha256, self.offset, self.node_id)
        return True

    def abort(self, reason: str) -> None:
        self.file.close()
        relay_failed(self.sha256, reason)
