"""Send a held model's bytes to the gateway on ``model.upload``.

The gateway asks for this to re-create a replica on another node or to serve
a download, since it keeps no copy of the weights itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from gridproto.frames import encode_frame
from nodeagent.models import ModelStore, is_sha256

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024


async def upload_model(
    store: ModelStore,
    message: dict[str, Any],
    *,
    send_json: Callable[[dict[str, Any]], Awaitable[None]],
    send_frame: Callable[[bytes, str], Awaitable[None]],
) -> None:
    """Stream the file as ``model.data`` frames; each send waits for the socket."""
    sha256 = message["sha256"]
    path = store.path_for(sha256) if is_sha256(sha256) else None
    if path is None or not path.exists():
        logger.warning("model.upload for %s: the model is not held", sha256)
        await send_json({"type": "model.upload_failed", "sha256": sha256, "error": "the node does not hold this model"})
        return
    size = path.stat().st_size
    logger.info("model %s: uploading %d bytes to the gateway", sha256, size)
    with path.open("rb") as source:
        offset = 0
        while True:
            chunk = await asyncio.to_thread(source.read, CHUNK_BYTES)
            final = offset + len(chunk) >= size
            header = {"type": "model.data", "sha256": sha256, "offset": offset, "final": final}
            await send_frame(encode_frame(header, chunk), f"model.data {sha256}")
            offset += len(chunk)
            if final:
                break
    logger.info("model %s: upload sent", sha256)
