"""The agent's websocket connection to the gateway, kept open for the process's life.

Each connection sends ``hello``, waits for ``welcome``, then sends heartbeats
and handles messages until it drops. The agent then reconnects with
exponential backoff and full jitter. It stops for good on ``stop()``
(SIGTERM or SIGINT), after a ``disconnect`` message, or when the gateway
rejects the token with HTTP 403.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from gridproto.frames import FrameError, decode_frame
from gridproto.messages import MessageError, parse_control
from nodeagent.backoff import Backoff
from nodeagent.config import AgentConfig
from nodeagent.dataset_jobs import DatasetJobHandler
from nodeagent.datasets import DatasetCatalog
from nodeagent.handshake import (
    GATEWAY_SCHEMA,
    HandshakeError,
    hello_message,
    parse_welcome,
)
from nodeagent.jobs import JobHandler
from nodeagent.models import ModelStore
from nodeagent.placement import ModelReceiver
from nodeagent.runner import Runner
from nodeagent.upload import upload_model

logger = logging.getLogger(__name__)

# websockets logs every handshake header at DEBUG, Authorization included, so
# its connections get a logger whose DEBUG output is never enabled.
_websocket_logger = logging.getLogger("nodeagent.websocket")
_websocket_logger.setLevel(logging.INFO)

# A connection that stayed open this long resets the backoff, in seconds.
STABLE_CONNECTION_SECONDS = 10.0
SUPERSEDED = 4409

T = TypeVar("T")


class TokenRejected(Exception):
    """The gateway rejected the upgrade with HTTP 403: invalid or revoked token."""


class Outcome(enum.Enum):
    STOPPED = "stopped"
    DISCONNECTED = "disconnected by the gateway"


class Agent:
    """One node: its models, its runner and its connection to the gateway."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        backoff: Backoff | None = None,
        handshake_timeout: float = 30.0,
    ) -> None:
        self.config = config
        self.store = ModelStore(config.data_dir, max_model_bytes=config.max_model_bytes)
        self.runner = Runner(
            concurrency=config.concurrency, delay_ms=config.inference_delay_ms
        )
        self.models = ModelReceiver(
            self.store, send_json=self.send_json, spawn=self.spawn
        )
        self.jobs = JobHandler(
            self.store,
            self.runner,
            send_json=self.send_json,
            send_frame=self.send_frame,
            spawn=self.spawn,
            batch_window_ms=config.batch_window_ms,
            max_batch_rows=config.max_batch_rows,
            fault=config.fault,
        )
        self.datasets = DatasetCatalog(config.data_dir)
        self.dataset_jobs = DatasetJobHandler(
            self.store,
            self.datasets,
            self.runner,
            send_json=self.send_json,
            send_frame=self.send_frame,
            spawn=self.spawn,
        )
        self._backoff = backoff or Backoff()
        self._handshake_timeout = handshake_timeout
        self._stopping = asyncio.Event()
        self._websocket: ClientConnection | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._endpoint_index = 0

    @property
    def endpoint(self) -> str:
        """The gateway endpoint this agent is connected or connecting to."""
        return self.config.endpoints[self._endpoint_index]

    def stop(self) -> None:
        """Ask ``run`` to send ``bye``, close with 1000 and return.

        Safe to call from a signal handler.
        """
        self._stopping.set()

    async def run(self) -> Outcome:
        """Load held models and serve the gateway until stopped or disconnected.

        Raises TokenRejected when the gateway rejects the token.
        """
        try:
            await self.models.load_held()
            await self.datasets.refresh()
            self.spawn(
                self.datasets.watch(self.config.dataset_rescan, self._datasets_changed)
            )
            return await self._connect_loop()
        finally:
            for task in list(self._tasks):
                task.cancel()
            self.runner.shutdown()
            self.models.shutdown()

    async def _datasets_changed(self) -> None:
        # Dropped while disconnected: the next hello carries the new list.
        await self.send_json(self.datasets.message())

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        # The event loop keeps only weak references to tasks.
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def send_json(self, message: dict[str, Any]) -> None:
        ids = [str(message[key]) for key in ("sha256", "job_id") if key in message]
        description = " ".join([message["type"], *ids])
        await self._send(json.dumps(message, separators=(",", ":")), description)

    async def send_frame(self, frame: bytes, description: str) -> None:
        await self._send(frame, description)

    async def _send(self, data: str | bytes, description: str) -> None:
        websocket = self._websocket
        if websocket is None:
            logger.info("dropping %s: not connected to the gateway", description)
            return
        try:
            await websocket.send(data)
        except ConnectionClosed:
            logger.info("dropping %s: the connection closed", description)

    async def _unless_stopped(self, awaitable: Awaitable[T]) -> T | None:
        """Await ``awaitable``, or cancel it and return None on ``stop()``."""
        task = asyncio.ensure_future(awaitable)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None

    async def _connect_loop(self) -> Outcome:
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            endpoint = self.endpoint
            opened_at: float | None = None
            close_code: int | None = None
            try:
                websocket = await self._unless_stopped(
                    connect(
                        endpoint,
                        additional_headers={
                            "Authorization": f"Bearer {self.config.token}"
                        },
                        compression=None,
                        max_size=self.config.ws_max_bytes,
                        logger=_websocket_logger,
                    )
                )
            except InvalidStatus as exc:
                if exc.response.status_code == 403:
                    raise TokenRejected(
                        f"the gateway at {endpoint} rejected the node token with "
                        "HTTP 403, so the token is invalid or revoked. Create a new "
                        "token for this node."
                    ) from None
                logger.warning(
                    "gateway %s rejected the connection: HTTP %d",
                    endpoint,
                    exc.response.status_code,
                )
            except (OSError, TimeoutError, WebSocketException) as exc:
                logger.warning("cannot connect to %s: %s", endpoint, exc)
            else:
                if websocket is None:
                    break
                opened_at = loop.time()
                logger.info("connected to %s", endpoint)
                try:
                    outcome = await self._serve(websocket)
                finally:
                    await websocket.close()
                if outcome is not None:
                    return outcome
                close_code = websocket.close_code
                self._log_close(close_code, websocket.close_reason)

            # A superseded connection never resets the backoff, so two agents
            # sharing one token take turns at a slow pace instead of a fast loop.
            lived = loop.time() - opened_at if opened_at is not None else 0.0
            if lived > STABLE_CONNECTION_SECONDS and close_code != SUPERSEDED:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            # With several gateways, each attempt goes to the next one, so a
            # gateway process that shut down or failed is not tried twice in a row.
            self._endpoint_index = (self._endpoint_index + 1) % len(self.config.endpoints)
            logger.info(
                "reconnecting to %s in %.2fs (attempt %d)",
                self.endpoint,
                delay,
                self._backoff.attempt,
            )
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            except TimeoutError:
                pass
        return Outcome.STOPPED

    def _log_close(self, code: int | None, reason: str | None) -> None:
        endpoint = self.endpoint
        if code == SUPERSEDED:
            logger.warning(
                "gateway %s closed the connection (4409): another agent connected "
                "with this node's token. Each node needs its own token.",
                endpoint,
            )
        elif code == 4400:
            logger.error(
                "gateway %s closed the connection for a protocol error (4400): %s",
                endpoint,
                reason,
            )
        elif code == 4408:
            logger.warning(
                "gateway %s closed the connection (4408): it missed 3 heartbeats",
                endpoint,
            )
        elif code == 1009:
            logger.error(
                "connection to %s closed (1009): a message was over the size limit",
                endpoint,
            )
        else:
            logger.warning(
                "connection to %s closed: code %s %s", endpoint, code, reason or ""
            )

    async def _serve(self, websocket: ClientConnection) -> Outcome | None:
        """Handle one open connection; return None when it drops."""
        try:
            reported = self.datasets.reports()
            hello = hello_message(self.config, self.store.held(), reported)
            await websocket.send(json.dumps(hello))
            welcome = await self._unless_stopped(self._receive_welcome(websocket))
        except ConnectionClosed:
            return None
        except (HandshakeError, TimeoutError) as exc:
            logger.error("handshake with %s failed: %s", self.endpoint, exc)
            await websocket.close(1002, "expected welcome")
            return None
        if welcome is None:
            await self._say_bye(websocket)
            return Outcome.STOPPED

        interval = float(welcome["heartbeat_interval"])
        self.jobs.max_frame_bytes = welcome["max_frame_bytes"]
        self.dataset_jobs.max_frame_bytes = welcome["max_frame_bytes"]
        logger.info(
            "welcomed as node %d, heartbeat every %.1fs, holding %d models",
            welcome["node_id"],
            interval,
            len(self.store.held()),
        )

        self._websocket = websocket
        if self.datasets.reports() != reported:
            # A rescan finished between hello and welcome.
            await self._datasets_changed()
        heartbeats = asyncio.create_task(self._send_heartbeats(websocket, interval))
        reader = asyncio.create_task(self._read(websocket))
        try:
            outcome = await self._unless_stopped(reader)
        finally:
            self._websocket = None
            heartbeats.cancel()
            self.models.reset()
        if outcome is None and self._stopping.is_set():
            await self._say_bye(websocket)
            return Outcome.STOPPED
        return outcome

    async def _receive_welcome(self, websocket: ClientConnection) -> dict[str, Any]:
        async with asyncio.timeout(self._handshake_timeout):
            data = await websocket.recv()
        return parse_welcome(data)

    async def _say_bye(self, websocket: ClientConnection) -> None:
        logger.info("stopping: sending bye to %s", self.endpoint)
        try:
            await websocket.send(json.dumps({"type": "bye", "reason": "shutting down"}))
        except ConnectionClosed:
            pass
        await websocket.close(1000, "shutting down")

    async def _send_heartbeats(
        self, websocket: ClientConnection, interval: float
    ) -> None:
        seq = 0
        while True:
            await asyncio.sleep(interval)
            seq += 1
            message = {
                "type": "heartbeat",
                "seq": seq,
                "in_flight": self.jobs.in_flight + self.dataset_jobs.in_flight,
                "sent_at": time.time(),
            }
            try:
                await websocket.send(json.dumps(message))
            except ConnectionClosed:
                return

    async def _read(self, websocket: ClientConnection) -> Outcome | None:
        """Handle messages until the connection drops (None) or ``disconnect``."""
        try:
            async for data in websocket:
                try:
                    if isinstance(data, str):
                        if await self._handle_text(data):
                            await websocket.close(1000, "disconnect requested")
                            return Outcome.DISCONNECTED
                    else:
                        await self._handle_binary(data)
                except ConnectionClosed:
                    raise
                except Exception:
                    # One message that trips a bug must not end the connection.
                    logger.exception("failed to handle a message from the gateway")
        except ConnectionClosed:
            pass
        return None

    async def _handle_text(self, data: str) -> bool:
        """Handle a control message; return True when it is ``disconnect``."""
        try:
            message = parse_control(data, GATEWAY_SCHEMA)
        except MessageError as exc:
            logger.warning("ignoring a message from the gateway: %s", exc)
            return False

        kind = message["type"]
        if kind == "model.offer":
            await self.models.offer(message)
        elif kind == "model.evict":
            await self.models.evict(message)
        elif kind == "infer.dataset":
            await self.dataset_jobs.request(message)
        elif kind == "model.upload":
            # A background task, so heartbeats and inference go on during the upload.
            self.spawn(upload_model(self.models.store, message, send_json=self.send_json, send_frame=self.send_frame))
        elif kind == "disconnect":
            logger.warning(
                "gateway %s sent disconnect (%s), so the agent stops and does not "
                "reconnect until restarted",
                self.endpoint,
                message["reason"],
            )
            return True
        elif kind == "error":
            logger.error("gateway error %s: %s", message["code"], message["message"])
        else:
            logger.warning("ignoring an unexpected %s message", kind)
        return False

    async def _handle_binary(self, data: bytes) -> None:
        try:
            header, body = decode_frame(data)
        except FrameError as exc:
            logger.warning("ignoring a binary frame from the gateway: %s", exc)
            return
        if header["type"] == "model.chunk":
            await self.models.chunk(header, body)
        elif header["type"] == "infer.request":
            await self.jobs.request(header, body)
        else:
            logger.warning("ignoring an unexpected binary %s frame", header["type"])
