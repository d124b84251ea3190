"""Live updates: status events over the real Redis channel layer, the browsers'
consumer, and the heartbeat history kept by the sweep."""

import asyncio
import time

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.test import Client

from apps.inference.tasks import sweep_nodes
from apps.registry import history, presence, services
from apps.registry.events import DASHBOARD_GROUP, publish_node_status
from apps.registry.models import Node
from gridsite.asgi import application
from tests.dashboard_data import make_node, make_user

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = {"protocol": 1, "capabilities": {}, "concurrency": 2}


async def join_dashboard_group() -> str:
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(DASHBOARD_GROUP, channel)
    return channel


async def receive(channel: str, timeout: float = 5.0) -> dict:
    return await asyncio.wait_for(get_channel_layer().receive(channel), timeout)


@pytest.fixture
def online_node():
    return make_node("node-a")


async def test_mark_offline_publishes(online_node):
    channel = await join_dashboard_group()
    await database_sync_to_async(services.mark_offline)(online_node.pk, "test")
    event = await receive(channel)
    assert event["type"] == "node.status"
    assert event["node_id"] == online_node.pk
    assert event["status"] == "offline"


async def test_offline_from_worker_thread_publishes(online_node):
    # A Celery worker thread has no event loop, so the event goes out on a loop of its own.
    channel = await join_dashboard_group()
    await asyncio.to_thread(services.mark_offline, online_node.pk, "sweep")
    event = await receive(channel)
    assert event["node_id"] == online_node.pk
    assert event["status"] == "offline"


async def test_repeated_offline_publishes_once(online_node):
    channel = await join_dashboard_group()
    await database_sync_to_async(services.mark_offline)(online_node.pk, "test")
    await database_sync_to_async(services.mark_offline)(online_node.pk, "again")
    await receive(channel)
    with pytest.raises(TimeoutError):
        await receive(channel, timeout=0.5)


async def test_mark_online_publishes():
    node = await database_sync_to_async(make_node)("node-a", Node.Status.OFFLINE)
    channel = await join_dashboard_group()
    await database_sync_to_async(services.mark_online)(node.pk, HELLO)
    event = await receive(channel)
    assert event["status"] == "online"


async def test_draining_node_stays_draining():
    node = await database_sync_to_async(make_node)("node-a", Node.Status.DRAINING)
    channel = await join_dashboard_group()
    await database_sync_to_async(services.mark_online)(node.pk, HELLO)
    event = await receive(channel)
    assert event["status"] == "draining"


def test_publish_survives_broken_layer(settings, caplog):
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": ["redis://127.0.0.1:1/0"]},
        }
    }
    from channels.layers import channel_layers

    channel_layers.backends.pop("default", None)
    try:
        publish_node_status(7, "offline")
    finally:
        channel_layers.backends.pop("default", None)
    assert "node 7: could not publish status offline" in caplog.text


# The browsers' consumer.


@pytest.fixture
def session_cookie():
    browser = Client()
    browser.force_login(make_user("viewer"))
    return f"sessionid={browser.cookies['sessionid'].value}".encode()


def dashboard_socket(
    cookie: bytes | None, origin: bytes = b"http://127.0.0.1"
) -> WebsocketCommunicator:
    headers = [(b"origin", origin), (b"host", b"127.0.0.1")]
    if cookie:
        headers.append((b"cookie", cookie))
    return WebsocketCommunicator(application, "/ws/dashboard/", headers=headers)


async def test_socket_rejects_anonymous():
    connected, _ = await dashboard_socket(None).connect()
    assert connected is False


async def test_socket_rejects_foreign_origin(session_cookie):
    connected, _ = await dashboard_socket(
        session_cookie, origin=b"http://evil.example"
    ).connect()
    assert connected is False


async def test_socket_pushes_status(session_cookie, online_node):
    socket = dashboard_socket(session_cookie)
    connected, _ = await socket.connect()
    assert connected
    await database_sync_to_async(services.mark_offline)(online_node.pk, "test")
    pushed = await socket.receive_json_from(timeout=5)
    await socket.disconnect()
    assert pushed["type"] == "node.status"
    assert pushed["node_id"] == online_node.pk
    assert pushed["status"] == "offline"


async def test_socket_drops_malformed_event(session_cookie):
    socket = dashboard_socket(session_cookie)
    await socket.connect()
    await get_channel_layer().group_send(
        DASHBOARD_GROUP, {"type": "node.status", "node_id": "1", "status": "<b>"}
    )
    nothing = await socket.receive_nothing(timeout=0.5)
    await socket.disconnect()
    assert nothing


# The heartbeat history.


def record_beat(node_id: int, in_flight: int, at: float) -> None:
    async_to_sync(presence.record_heartbeat)(node_id, in_flight, at)


def test_history_records_samples(online_node):
    record_beat(online_node.pk, 3, 1000.0)
    history.record_samples(1001.5)
    record_beat(online_node.pk, 1, 1002.0)
    history.record_samples(1004.0)
    samples = history.read_samples(online_node.pk)
    assert [s.at for s in samples] == [1001.5, 1004.0]
    assert [s.in_flight for s in samples] == [3, 1]
    assert samples[1].heartbeat_age == pytest.approx(2.0)
    history.forget_samples(online_node.pk)


def test_history_is_capped(online_node):
    record_beat(online_node.pk, 0, 1000.0)
    for step in range(history.MAX_SAMPLES + 5):
        history.record_samples(1000.0 + step)
    samples = history.read_samples(online_node.pk)
    assert len(samples) == history.MAX_SAMPLES
    assert samples[0].at == 1005.0
    history.forget_samples(online_node.pk)


def test_sweep_records_history(online_node):
    record_beat(online_node.pk, 2, time.time())
    sweep_nodes()
    samples = history.read_samples(online_node.pk)
    assert len(samples) == 1
    assert samples[0].in_flight == 2
    history.forget_samples(online_node.pk)
    presence.forget_heartbeat(online_node.pk)
