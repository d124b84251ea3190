"""Node tokens are bound to one node and are separate from API tokens."""

import json

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model

from apps.accounts.models import ApiToken
from apps.registry.models import Node
from gridsite.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


def hello(name: str) -> str:
    return json.dumps(
        {
            "type": "hello",
            "protocol": 1,
            "name": name,
            "capabilities": {
                "torch": "2.13.0",
                "cpu_count": 2,
                "memory_bytes": 1 << 30,
                "device": "cpu",
            },
            "concurrency": 1,
            "models": [],
        }
    )


def communicator(token: str) -> WebsocketCommunicator:
    return WebsocketCommunicator(
        application,
        "/ws/agent/",
        headers=[(b"authorization", f"Bearer {token}".encode())],
    )


async def test_token_cannot_act_as_other_node():
    node_a, token_a = await _enroll("node-a")
    node_b, _ = await _enroll("node-b")
    comm = communicator(token_a)
    connected, _ = await comm.connect()
    # The hello names node-b, but the token decides which node this socket is.
    await comm.send_to(text_data=hello("node-b"))
    welcome = json.loads(await comm.receive_from(timeout=5))
    status_a = (await Node.objects.aget(pk=node_a.pk)).status
    status_b = (await Node.objects.aget(pk=node_b.pk)).status
    await comm.disconnect()
    assert connected
    assert welcome["node_id"] == node_a.pk
    assert status_a == "online"
    assert status_b == "offline"


async def test_rotated_token_stops_working():
    node, old = await _enroll("node-a")
    await sync_to_async(node.rotate_token)()
    connected, _ = await communicator(old).connect()
    assert connected is False


async def test_api_token_cannot_open_agent_socket():
    user = await sync_to_async(get_user_model().objects.create_user)(
        "root", is_staff=True
    )
    _, plain = await sync_to_async(ApiToken.issue)(user=user, name="test")
    connected, _ = await communicator(plain).connect()
    assert connected is False


async def _enroll(name: str) -> tuple[Node, str]:
    return await sync_to_async(Node.enroll)(name)
