"""Where a request waits for its job's outcome.

Each event loop owns one reply channel on the Channels layer and one task that
reads it, and hands each `job.done` message to the future registered for its
job. One subscription per process, instead of one per request, keeps Redis's
subscription count flat under load.
"""

from __future__ import annotations

import asyncio
import logging

from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)


class Mailbox:
    def __init__(self) -> None:
        self.channel: str | None = None
        self._waiters: dict[str, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> str:
        async with self._lock:
            if self.channel is None:
                self.channel = await get_channel_layer().new_channel("reply.")
                self._reader = asyncio.create_task(self._read(), name="grid-mailbox")
        return self.channel

    def expect(self, job_id: str) -> asyncio.Future:
        """Register interest in a job before it is dispatched, so no answer is missed."""
        future = asyncio.get_running_loop().create_future()
        self._waiters[job_id] = future
        return future

    def forget(self, job_id: str) -> None:
        self._waiters.pop(job_id, None)

    async def _read(self) -> None:
        layer = get_channel_layer()
        while True:
            try:
                message = await layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("reading reply channel %s failed; retrying in 1 s", self.channel)
                await asyncio.sleep(1)
                continue
            future = self._waiters.pop(message.get("job_id", ""), None)
            if future is not None and not future.done():
                future.set_result(message)


_mailboxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}


def mailbox() -> Mailbox:
    loop = asyncio.get_running_loop()
    box = _mailboxes.get(loop)
    if box is None:
        box = _mailboxes[loop] = Mailbox()
    return box
