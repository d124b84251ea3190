"""The websocket consumer that owns one node agent's connection.

It authenticates the agent by the token in its handshake headers, keeps the
node's presence and heartbeats, forwards work sent to it over the Channels
layer, and hands the agent's answers to the inference services. The protocol
is described in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from pathlib import Path
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from apps.accounts.authentication import bearer_token
from apps.inference import payloads
from apps.inference.delivery import send_to_channel
from apps.inference.services import datalocal, dispatch, placement, relay
from apps.registry import datasets, presence, services
from gridproto import PROTOCOL_VERSION
from gridproto.frames import FrameError, decode_frame, encode_frame
from gridproto.messages import AGENT_MESSAGES, MessageError, parse_control
from gridsite import metrics

logger = logging.getLogger(__name__)

CLOSE_PROTOCOL = 4400
CLOSE_HEARTBEAT = 4408
CLOSE_SUPERSEDED = 4409
CLOSE_GOING_AWAY = 1001

# The consumers with an open agent socket in this process, for the shutdown
# drain (apps.registry.shutdown).
live_consumers: weakref.WeakSet[AgentConsumer] = weakref.WeakSet()


def _enqueue_advance(model_pks: list[int]) -> None:
    from apps.inference.tasks import advance_placement

    for pk in set(model_pks):
        advance_placement.delay(pk)


class AgentConsumer(AsyncWebsocketConsumer):
    node_id: int | None = None

    async def connect(self) -> None:
        headers = dict(self.scope.get("headers", []))
        peer = (self.scope.get("client") or ["?"])[0]
        token = bearer_token(headers.get(b"authorization", b"").decode("latin-1"))
        node = await database_sync_to_async(services.node_for_token)(token) if token else None
        if node is None:
            reason = "no bearer token in the Authorization header" if token is None else "unknown or revoked node token"
            logger.warning("rejected agent connection from %s: %s", peer, reason)
            await self.close()
            return
        self.node_id = node.pk
        self.node_name = node.name
        self.greeted = False
        self.lost = False
        self.opened_at = self.last_seen = time.monotonic()
        # job id -> (attempt, reply channel) for requests sent to this agent.
        self.in_flight: dict[str, tuple[int, str]] = {}
        self.background: set[asyncio.Task] = set()
        # sha256 -> the relay this agent is uploading to the staging folder.
        self.relays: dict[str, relay.RelayWriter] = {}
        await self.accept()
        live_consumers.add(self)
        self._spawn(self._watch_heartbeats())
        logger.info("node %s (%s) connected from %s", self.node_id, self.node_name, peer)

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def disconnect(self, code: int) -> None:
        if self.node_id is None:
            return
        for task in list(self.background):
            if task is not asyncio.current_task():
                task.cancel()
        logger.info("node %s (%s) disconnected with code %s", self.node_id, self.node_name, code)
        for sha256, writer in list(self.relays.items()):
            await asyncio.to_thread(writer.abort, f"node {self.node_id} disconnected during the upload")
        self.relays.clear()
        await self._node_lost(f"socket closed with code {code}")

    async def _node_lost(self, reason: str) -> None:
        """Mark the node offline and move its work, unless a newer socket took over."""
        if self.lost or not self.greeted:
            return
        self.lost = True
        if not await presence.release_presence(self.node_id, self.channel_name):
            logger.info("node %s: a newer connection owns the node; leaving it online", self.node_id)
            return
        await database_sync_to_async(services.mark_offline)(self.node_id, reason)
        await dispatch.fail_over_node(self.node_id, reason)
        models = await database_sync_to_async(placement.fail_node_transfers)(self.node_id, f"node went offline: {reason}")
        await database_sync_to_async(_enqueue_advance)(models)

    async def _watch_heartbeats(self) -> None:
        interval = settings.GRID["HEARTBEAT_INTERVAL"]
        limit = interval * settings.GRID["HEARTBEAT_MISSES"]
        while True:
            await asyncio.sleep(interval / 2)
            silent = time.monotonic() - self.last_seen
            if not self.greeted and silent > limit:
                logger.warning("node %s sent no hello within %.1f s; closing", self.node_id, limit)
                await self._close_safely(CLOSE_PROTOCOL)
                return
            if self.greeted and silent > limit:
                logger.warning("node %s: no heartbeat for %.1f s; closing and marking offline", self.node_id, silent)
                await self._node_lost(f"no heartbeat for {silent:.1f} s")
                await self._close_safely(CLOSE_HEARTBEAT)
                return

    # Agent -> gateway.

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if bytes_data is not None:
            await self._receive_frame(bytes_data)
            return
        try:
            message = parse_control(text_data or "", AGENT_MESSAGES)
        except MessageError as exc:
            logger.warning("node %s sent an invalid message: %s", self.node_id, exc)
            await self._send_json({"type": "error", "code": "invalid_message", "message": str(exc)})
            if not self.greeted:
                await self._close_safely(CLOSE_PROTOCOL)
            return
        kind = message["type"]
        if kind != "hello" and not self.greeted:
            await self._protocol_error(f"expected hello first, got {kind}")
            return
        self.last_seen = time.monotonic()
        handler = getattr(self, "_on_" + kind.replace(".", "_"))
        await handler(message)

    async def _protocol_error(self, text: str) -> None:
        logger.warning("node %s protocol error: %s", self.node_id, text)
        await self._send_json({"type": "error", "code": "protocol", "message": text})
        await self._close_safely(CLOSE_PROTOCOL)

    async def _on_hello(self, message: dict[str, Any]) -> None:
        if self.greeted:
            await self._protocol_error("hello sent twice")
            return
        if message["protocol"] != PROTOCOL_VERSION:
            await self._protocol_error(f"protocol {message['protocol']} is not supported; this gateway speaks {PROTOCOL_VERSION}")
            return
        previous = await presence.claim_presence(self.node_id, self.channel_name)
        if previous and previous != self.channel_name:
            logger.warning("node %s connected again; closing its previous socket", self.node_id)
            await send_to_channel(previous, {"type": "agent.supersede"})
        self.greeted = True
        await database_sync_to_async(services.mark_online)(self.node_id, message)
        await database_sync_to_async(datasets.replace_node_datasets)(self.node_id, message.get("datasets", []))
        await presence.record_heartbeat(self.node_id, 0)
        await self._send_json(
            {
                "type": "welcome",
                "protocol": PROTOCOL_VERSION,
                "node_id": self.node_id,
                "heartbeat_interval": settings.GRID["HEARTBEAT_INTERVAL"],
                "max_frame_bytes": settings.GRID["WS_MAX_BYTES"],
            }
        )
        held = [m["sha256"] for m in message["models"] if isinstance(m, dict) and isinstance(m.get("sha256"), str)]
        evict, lost = await database_sync_to_async(placement.reconcile)(self.node_id, held)
        for sha256 in evict:
            logger.info("node %s holds unknown model %s; evicting", self.node_id, sha256)
            await self._send_json({"type": "model.evict", "sha256": sha256})
        ready = [sha for sha in held if sha not in evict]
        for sha256 in ready:
            await database_sync_to_async(placement.report_ready)(self.node_id, sha256)
        await database_sync_to_async(_enqueue_advance)(lost)

    async def _on_heartbeat(self, message: dict[str, Any]) -> None:
        metrics.observe_heartbeat(message.get("sent_at"), time.time())
        if self.lost:
            # A superseded socket must not register itself again.
            return
        if await presence.record_live_heartbeat(self.node_id, self.channel_name, message["in_flight"]):
            logger.warning("node %s: its presence key was missing from Redis (restarted?); registered this socket again", self.node_id)

    async def _on_model_ready(self, message: dict[str, Any]) -> None:
        logger.info("node %s loaded model %s", self.node_id, message["sha256"])
        models = await database_sync_to_async(placement.report_ready)(self.node_id, message["sha256"])
        await database_sync_to_async(_enqueue_advance)(models)

    async def _on_model_failed(self, message: dict[str, Any]) -> None:
        models = await database_sync_to_async(placement.report_failed)(self.node_id, message["sha256"], message["error"])
        await database_sync_to_async(_enqueue_advance)(models)

    async def _on_model_evicted(self, message: dict[str, Any]) -> None:
        logger.info("node %s evicted model %s", self.node_id, message["sha256"])

    async def _on_infer_error(self, message: dict[str, Any]) -> None:
        entry = self._claim_answer(message["job_id"], message["attempt"])
        if entry is None:
            return
        await dispatch.finish_job(
            message["job_id"], node_id=self.node_id, attempt=message["attempt"], reply_channel=entry[1], error=message["error"], kind=message["kind"]
        )

    async def _on_infer_summary(self, message: dict[str, Any]) -> None:
        entry = self._claim_answer(message["job_id"], message["attempt"])
        if entry is None:
            return
        await datalocal.finish_summary(message, node_id=self.node_id, reply_channel=entry[1])

    async def _on_datasets(self, message: dict[str, Any]) -> None:
        await database_sync_to_async(datasets.replace_node_datasets)(self.node_id, message["datasets"])

    async def _on_bye(self, message: dict[str, Any]) -> None:
        logger.info("node %s is leaving: %s", self.node_id, message["reason"][:200])

    def _claim_answer(self, job_id: Any, attempt: Any) -> tuple[int, str] | None:
        """Take the in-flight entry an answer refers to, or log and ignore the answer."""
        entry = self.in_flight.get(job_id) if isinstance(job_id, str) else None
        if entry is None or entry[0] != attempt:
            logger.warning("node %s answered job %s attempt %s, which was not sent to it; ignored", self.node_id, job_id, attempt)
            return None
        del self.in_flight[job_id]
        return entry

    async def _receive_frame(self, data: bytes) -> None:
        if not self.greeted:
            await self._protocol_error("binary frame before hello")
            return
        try:
            header, body = decode_frame(data)
        except FrameError as exc:
            logger.warning("node %s sent an invalid frame: %s", self.node_id, exc)
            return
        self.last_seen = time.monotonic()
        if header["type"] == "model.data":
            await self._receive_relay_chunk(header, body)
            return
        if header["type"] != "infer.result":
            logger.warning("node %s sent an unexpected %s frame; ignored", self.node_id, header["type"])
            return
        entry = self._claim_answer(header.get("job_id"), header.get("attempt"))
        if entry is None:
            return
        elapsed = header.get("elapsed_ms")
        await dispatch.finish_job(
            header["job_id"],
            node_id=self.node_id,
            attempt=header["attempt"],
            reply_channel=entry[1],
            output=bytes(body),
            compute_ms=float(elapsed) if isinstance(elapsed, (int, float)) else None,
        )

    async def _receive_relay_chunk(self, header: dict[str, Any], body: memoryview) -> None:
        sha256, offset, final = header.get("sha256"), header.get("offset"), header.get("final")
        if not isinstance(sha256, str) or not isinstance(offset, int) or not isinstance(final, bool):
            logger.warning("node %s sent a malformed model.data header; ignored", self.node_id)
            return
        writer = self.relays.get(sha256)
        if writer is None:
            if offset != 0 or await asyncio.to_thread(relay.relay_state, sha256) != str(self.node_id):
                logger.warning("node %s sent model.data for %s, which was not requested; ignored", self.node_id, sha256)
                return
            writer = self.relays[sha256] = await asyncio.to_thread(relay.RelayWriter, sha256, self.node_id)
        try:
            await asyncio.to_thread(writer.write, offset, bytes(body))
        except (ValueError, OSError) as exc:
            del self.relays[sha256]
            await asyncio.to_thread(writer.abort, str(exc))
            return
        if final:
            del self.relays[sha256]
            if await asyncio.to_thread(writer.finish):
                models = await database_sync_to_async(placement.models_with_file)(sha256)
                await database_sync_to_async(_enqueue_advance)(models)

    async def _on_model_upload_failed(self, message: dict[str, Any]) -> None:
        await asyncio.to_thread(relay.relay_failed, message["sha256"], f"node {self.node_id}: {message['error']}")

    # Channels layer -> agent.

    async def agent_heartbeat_check(self, event: dict[str, Any]) -> None:
        """Close a silent agent now when the periodic sweep finds its heartbeats stale."""
        limit = settings.GRID["HEARTBEAT_INTERVAL"] * settings.GRID["HEARTBEAT_MISSES"]
        silent = time.monotonic() - self.last_seen
        if self.greeted and silent > limit:
            logger.warning("node %s: no heartbeat for %.1f s at the sweep; closing and marking offline", self.node_id, silent)
            await self._node_lost(f"no heartbeat for {silent:.1f} s")
            await self._close_safely(CLOSE_HEARTBEAT)

    async def agent_upload(self, event: dict[str, Any]) -> None:
        await self._send_json({"type": "model.upload", "sha256": event["sha256"]})

    async def agent_dispatch(self, event: dict[str, Any]) -> None:
        job_id = event["job_id"]
        body = event.get("body")
        if body is None:
            body = await payloads.load_input(job_id)
        if body is None:
            await dispatch.fail_job(job_id, code="input_expired", message="the job's input expired before dispatch", reply_channel=event["reply_channel"])
            return
        self.in_flight[job_id] = (event["attempt"], event["reply_channel"])
        header = {"type": "infer.request", "job_id": job_id, "attempt": event["attempt"], "sha256": event["sha256"], "timeout": event["timeout"]}
        await self._send_safely(bytes_data=encode_frame(header, body))

    async def agent_infer_dataset(self, event: dict[str, Any]) -> None:
        self.in_flight[event["job_id"]] = (event["attempt"], event["reply_channel"])
        await self._send_json(datalocal.request_message(event))

    async def agent_place(self, event: dict[str, Any]) -> None:
        # Streaming runs beside the consumer's message loop, so heartbeats and
        # inference keep flowing during a long transfer.
        self._spawn(self._stream_model(event))

    async def _stream_model(self, event: dict[str, Any]) -> None:
        sha256, size = event["sha256"], event["size"]
        chunk_bytes = settings.GRID["MODEL_CHUNK_BYTES"]
        await self._send_json({"type": "model.offer", "sha256": sha256, "size": size, "model_id": event["model_id"]})
        try:
            with Path(event["path"]).open("rb") as source:
                offset = 0
                while True:
                    chunk = await asyncio.to_thread(source.read, chunk_bytes)
                    final = offset + len(chunk) >= size or not chunk
                    header = {"type": "model.chunk", "sha256": sha256, "offset": offset, "final": final}
                    if not await self._send_safely(bytes_data=encode_frame(header, chunk)):
                        return
                    offset += len(chunk)
                    if final:
                        break
        except OSError as exc:
            logger.error("node %s: streaming model %s failed: %s", self.node_id, sha256, exc)
            models = await database_sync_to_async(placement.report_failed)(self.node_id, sha256, f"the gateway could not read the staged file: {exc}")
            await database_sync_to_async(_enqueue_advance)(models)
            return
        logger.info("node %s: sent model %s (%s bytes)", self.node_id, sha256, offset)

    async def agent_evict(self, event: dict[str, Any]) -> None:
        await self._send_json({"type": "model.evict", "sha256": event["sha256"]})

    async def agent_disconnect(self, event: dict[str, Any]) -> None:
        await self._send_json({"type": "disconnect", "reason": event.get("reason", "requested by an operator")})
        await self._node_lost(event.get("reason", "disconnected by an operator"))
        await self._close_safely(1000)

    async def go_away(self, reason: str) -> None:
        """Take the node offline here, failing its jobs over, then close with 1001.

        The agent reconnects, to another gateway process when it has a list of them.
        """
        live_consumers.discard(self)
        await self._node_lost(reason)
        await self._close_safely(CLOSE_GOING_AWAY)

    async def agent_supersede(self, event: dict[str, Any]) -> None:
        self.lost = True  # The newer socket owns the node's state now.
        await self._close_safely(CLOSE_SUPERSEDED)

    async def _send_json(self, message: dict[str, Any]) -> None:
        await self._send_safely(text_data=json.dumps(message))

    async def _send_safely(self, **data: Any) -> bool:
        """Send to the agent; on a closed socket, mark the node lost instead of raising.

        uvicorn raises once the peer has gone, and an exception escaping a
        handler would end the consumer before its disconnect handler runs, so
        the node would stay online until the heartbeat watchdog noticed.
        """
        try:
            await self.send(**data)
            return True
        except (RuntimeError, OSError) as exc:
            logger.info("node %s: send failed because the socket is closed: %s", self.node_id, exc)
            await self._node_lost("socket closed")
            return False

    async def _close_safely(self, code: int) -> None:
        try:
            await self.close(code=code)
        except (RuntimeError, OSError) as exc:
            logger.info("node %s: socket already closed before close code %s: %s", self.node_id, code, exc)
