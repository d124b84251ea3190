"""Graceful shutdown of a gateway process: agents go elsewhere before it exits.

uvicorn (0.55) closes every open websocket with code 1012 as the first step of
its shutdown, and runs the ASGI lifespan shutdown only after that. To close
agent sockets with 1001 and move their nodes one by one, the drain has to run
before uvicorn's shutdown starts. So the lifespan startup wraps uvicorn's
SIGTERM and SIGINT handlers: the first signal starts the drain
(apps.registry.shutdown) and hands the signal to uvicorn when the drain ends.
A second signal goes to uvicorn at once. While draining, new agent sockets are
accepted and closed with 1001, so agents reconnect to another process. The
lifespan shutdown closes any agent socket left, as a fallback for servers
that do not send signals through this path.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Any

from django.conf import settings

logger = logging.getLogger(__name__)

GOING_AWAY = 1001


class GracefulShutdown:
    """ASGI middleware around the whole application (HTTP, websockets, lifespan)."""

    def __init__(self, app) -> None:
        self.app = app
        self.draining = False
        self._drain_task: asyncio.Task | None = None
        self._previous: dict[int, Any] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket" and self.draining:
            await self._turn_away(receive, send)
        else:
            await self.app(scope, receive, send)

    async def _turn_away(self, receive, send) -> None:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": GOING_AWAY})

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._wrap_signals(asyncio.get_running_loop())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._close_remaining()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _wrap_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: SIGTERM will not drain agent connections first")
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if not callable(previous):
                continue
            self._previous[signum] = previous
            signal.signal(signum, lambda num, frame: loop.call_soon_threadsafe(self._on_signal, num))

    def _on_signal(self, signum: int) -> None:
        if self._drain_task is not None:
            logger.info("received %s again; stopping without waiting for the drain", signal.Signals(signum).name)
            self._drain_task.cancel()
            self._pass_on(signum)
            return
        logger.info("received %s; moving agents to other gateway processes before shutdown", signal.Signals(signum).name)
        self.draining = True
        self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit(signum))

    async def _drain_then_exit(self, signum: int) -> None:
        from apps.registry.shutdown import drain_agents

        try:
            count = await drain_agents(settings.GRID["SHUTDOWN_DRAIN"])
            logger.info("drained %s agent connections", count)
        except asyncio.CancelledError:
            return
        except Exception:
            logger.exception("draining agent connections failed; shutting down anyway")
        self._pass_on(signum)

    def _pass_on(self, signum: int) -> None:
        handler = self._previous.get(signum)
        if handler is not None:
            handler(signum, None)

    async def _close_remaining(self) -> None:
        from apps.registry.shutdown import close_remaining

        try:
            count = await close_remaining()
        except Exception:
            logger.exception("closing agent connections at shutdown failed")
            return
        if count:
            logger.info("closed %s agent connections at shutdown", count)
