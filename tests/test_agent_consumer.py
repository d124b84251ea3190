"""The agent consumer over Channels' WebsocketCommunicator, on real PostgreSQL and Redis."""

import asyncio
import json

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from apps.registry import presence
from apps.registry.models import Node
from gridsite.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = {
    "type": "hello",
    "protocol": 1,
    "name": "node-a",
    "capabilities": {"torch": "2.13.0", "cpu_count": 2, "memory_bytes": 1 << 30, "device": "cpu"},
    "concurrency": 2,
    "models": [],
}


def communicator(token: str | None) -> WebsocketCommunicator:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    return WebsocketCommunicator(application, "/ws/agent/", headers=headers)


@pytest.fixture
def enrolled():
    node, token = Node.enroll("node-a")
    return node, token


async def greet(comm: WebsocketCommunicator) -> dict:
    connected, _ = await comm.connect()
    assert connected
    await comm.send_to(text_data=json.dumps(HELLO))
    return json.loads(await comm.receive_from(timeout=5))


async def test_missing_token_rejected():
    comm = communicator(None)
    connected, _ = await comm.connect()
    assert connected is False


async def test_wrong_token_rejected(enrolled, caplog):
    comm = communicator("node_not-a-real-token")
    connected, _ = await comm.connect()
    assert connected is False
    assert "unknown or revoked node token" in caplog.text
    assert "node_not-a-real-token" not in caplog.text


async def test_revoked_token_rejected(enrolled):
    node, token = enrolled
    await Node.objects.filter(pk=node.pk).aupdate(token_revoked=True)
    connected, _ = await communicator(token).connect()
    assert connected is False


async def test_hello_gets_welcome(enrolled):
    node, token = enrolled
    comm = communicator(token)
    welcome = await greet(comm)
    assert welcome["type"] == "welcome"
    assert welcome["node_id"] == node.pk
    assert welcome["heartbeat_interval"] == 2.0
    refreshed = await Node.objects.aget(pk=node.pk)
    assert refreshed.status == "online"
    assert refreshed.capabilities["cpu_count"] == 2
    assert await presence.presence_of(node.pk) is not None
    await comm.disconnect()


async def test_heartbeat_skips_postgres(enrolled):
    node, token = enrolled
    comm = communicator(token)
    await greet(comm)
    before = (await Node.objects.aget(pk=node.pk)).last_heartbeat
    await comm.send_to(text_data=json.dumps({"type": "heartbeat", "seq": 1, "in_flight": 3}))
    await asyncio.sleep(0.2)
    after = await Node.objects.aget(pk=node.pk)
    beats = await database_sync_to_async(presence.read_heartbeats)()
    assert after.last_heartbeat == before
    assert beats[node.pk][1] == 3
    await comm.disconnect()


async def test_disconnect_marks_offline(enrolled):
    node, token = enrolled
    comm = communicator(token)
    await greet(comm)
    await comm.disconnect()
    refreshed = await Node.objects.aget(pk=node.pk)
    assert refreshed.status == "offline"
    assert await presence.presence_of(node.pk) is None


async def test_message_before_hello_closes(enrolled):
    _, token = enrolled
    comm = communicator(token)
    await comm.connect()
    await comm.send_to(text_data=json.dumps({"type": "heartbeat", "seq": 1, "in_flight": 0}))
    error = json.loads(await comm.receive_from(timeout=5))
    closed = await comm.receive_output(timeout=5)
    assert error["code"] == "protocol"
    assert closed == {"type": "websocket.close", "code": 4400}


async def test_unknown_protocol_closes(enrolled):
    _, token = enrolled
    comm = communicator(token)
    await comm.connect()
    await comm.send_to(text_data=json.dumps({**HELLO, "protocol": 99}))
    error = json.loads(await comm.receive_from(timeout=5))
    assert "protocol 99 is not supported" in error["message"]


async def test_heartbeat_timeout_marks_offline(enrolled, settings):
    settings.GRID = {**settings.GRID, "HEARTBEAT_INTERVAL": 0.2}
    node, token = enrolled
    comm = communicator(token)
    await greet(comm)
    closed = await comm.receive_output(timeout=5)
    refreshed = await Node.objects.aget(pk=node.pk)
    assert closed == {"type": "websocket.close", "code": 4408}
    assert refreshed.status == "offline"


async def test_second_connection_supersedes_first(enrolled):
    node, token = enrolled
    first = communicator(token)
    await greet(first)
    second = communicator(token)
    await greet(second)
    closed = await first.receive_output(timeout=5)
    await first.disconnect(code=4409)
    refreshed = await Node.objects.aget(pk=node.pk)
    assert closed == {"type": "websocket.close", "code": 4409}
    assert refreshed.status == "online"
    await second.disconnect()


async def test_answer_for_unknown_job_ignored(enrolled, caplog):
    _, token = enrolled
    comm = communicator(token)
    await greet(comm)
    message = {"type": "infer.error", "job_id": "not-sent", "attempt": 1, "error": "x", "kind": "model"}
    await comm.send_to(text_data=json.dumps(message))
    await asyncio.sleep(0.2)
    assert "which was not sent to it; ignored" in caplog.text
    await comm.disconnect()
