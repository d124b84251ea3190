"""Operator actions: the services on real PostgreSQL and Redis, and the views around them."""

import asyncio

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.test import Client

from apps.inference import operations as model_operations
from apps.inference.models import InferenceJob, Model, Placement
from apps.registry import operations as node_operations
from apps.registry import presence
from apps.registry.models import Node
from gridsite.celery import app as celery_app
from tests.dashboard_data import make_job, make_model, make_node, make_user, place

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def eager_celery(settings, tmp_path):
    settings.GRID = {**settings.GRID, "STAGING_DIR": tmp_path / "staging"}
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = False


async def listen_as(node_id: int) -> str:
    """Register a new layer channel as the node's socket and return its name."""
    channel = await get_channel_layer().new_channel()
    await presence.claim_presence(node_id, channel)
    return channel


async def receive(channel: str, timeout: float = 5.0) -> dict:
    return await asyncio.wait_for(get_channel_layer().receive(channel), timeout)


def status_of(node: Node) -> str:
    return Node.objects.get(pk=node.pk).status


# The services.


def test_drain_online_node():
    node = make_node("node-a")
    assert node_operations.drain_node(node_id=node.pk, actor="test") is True
    assert status_of(node) == "draining"


def test_drain_offline_node_refused():
    node = make_node("node-a", Node.Status.OFFLINE)
    assert node_operations.drain_node(node_id=node.pk, actor="test") is False
    assert status_of(node) == "offline"


def test_drain_replaces_held_models():
    owner = make_user("owner")
    node = make_node("node-a")
    model = make_model("digits", owner)
    place(model, node)
    node_operations.drain_node(node_id=node.pk, actor="test")
    model.refresh_from_db()
    # The placement pass ran (Celery is eager) and found no online node left.
    assert model.placement_error.startswith("0 of 1 replicas ready; 0 online nodes")


def test_resume_without_socket_goes_offline():
    node = make_node("node-a", Node.Status.DRAINING)
    assert node_operations.resume_node(node_id=node.pk, actor="test") is True
    assert status_of(node) == "offline"


def test_resume_with_socket_goes_online():
    node = make_node("node-a", Node.Status.DRAINING)
    async_to_sync(presence.claim_presence)(node.pk, "a-channel")
    assert node_operations.resume_node(node_id=node.pk, actor="test") is True
    assert status_of(node) == "online"


def test_resume_online_node_refused():
    node = make_node("node-a")
    assert node_operations.resume_node(node_id=node.pk, actor="test") is False


async def test_disconnect_sends_to_consumer():
    node = await database_sync_to_async(make_node)("node-a")
    channel = await listen_as(node.pk)
    disconnect = database_sync_to_async(node_operations.disconnect_node)
    delivered = await disconnect(node_id=node.pk, actor="test", reason="maintenance")
    message = await receive(channel)
    assert delivered is True
    assert message == {"type": "agent.disconnect", "reason": "maintenance"}
    assert await database_sync_to_async(status_of)(node) == "offline"


def test_disconnect_without_socket_fails_jobs_over():
    owner = make_user("owner")
    node = make_node("node-a")
    model = make_model("digits", owner)
    place(model, node)
    job = make_job(
        model, node=node, status=InferenceJob.Status.RUNNING, latency_ms=None
    )
    delivered = node_operations.disconnect_node(node_id=node.pk, actor="test")
    job.refresh_from_db()
    assert delivered is False
    assert status_of(node) == "offline"
    # No other node has the model, so the failover ends the job.
    assert job.status == "failed"


def test_disconnect_all_skips_offline():
    make_node("node-a")
    make_node("node-b", Node.Status.DRAINING)
    make_node("node-c", Node.Status.OFFLINE)
    count = node_operations.disconnect_all(actor="test")
    assert count == 2
    assert set(Node.objects.values_list("status", flat=True)) == {"offline"}


@pytest.fixture
def held_model():
    """A model with a ready replica and a finished job on node-a."""
    node = make_node("node-a")
    model = make_model("digits", make_user("owner"), content=b"same file")
    place(model, node)
    make_job(model, node=node)
    return model, node


async def test_delete_model_evicts_then_deletes(held_model):
    model, node = held_model
    channel = await listen_as(node.pk)
    evicted = await database_sync_to_async(model_operations.delete_model)(
        model_pk=model.pk, actor="test"
    )
    message = await receive(channel)
    assert evicted == [node.pk]
    assert message == {"type": "agent.evict", "sha256": model.sha256}
    assert not await Model.objects.filter(pk=model.pk).aexists()
    assert not await Placement.objects.aexists()
    assert not await InferenceJob.objects.aexists()


async def test_delete_model_keeps_shared_file(held_model):
    model, node = held_model
    twin = await database_sync_to_async(make_model)(
        "digits-copy", model.owner, content=b"same file"
    )
    await database_sync_to_async(place)(twin, node)
    channel = await listen_as(node.pk)
    evicted = await database_sync_to_async(model_operations.delete_model)(
        model_pk=model.pk, actor="test"
    )
    with pytest.raises(TimeoutError):
        await receive(channel, timeout=0.5)
    assert evicted == []
    assert await Placement.objects.filter(model=twin, node=node).aexists()


def test_delete_missing_model_is_noop():
    assert model_operations.delete_model(model_pk=999999, actor="test") == []


def test_replace_model_runs_placement():
    owner = make_user("owner")
    model = make_model("digits", owner, replicas=2)
    model_operations.replace_model(model_pk=model.pk, actor="test")
    model.refresh_from_db()
    assert model.placement_error.startswith("0 of 2 replicas ready; 0 online nodes")


# The views: staff only, a confirmation step, CSRF.


@pytest.fixture
def staff():
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(make_user("operator", staff=True))
    return browser


def csrf_post(browser: Client, path: str):
    """POST the way the confirmation form does: with the page's CSRF token."""
    page = browser.get(path)
    token = page.context["csrf_token"]
    return browser.post(path, {"csrfmiddlewaretoken": str(token)})


def test_drain_view_asks_first(staff):
    node = make_node("node-a")
    page = staff.get(f"/nodes/{node.pk}/drain/")
    assert page.status_code == 200
    assert "Drain node-a?" in page.content.decode()
    assert status_of(node) == "online"


def test_drain_view_post_drains(staff):
    node = make_node("node-a")
    response = csrf_post(staff, f"/nodes/{node.pk}/drain/")
    assert response.status_code == 302
    assert response["Location"] == f"/nodes/{node.pk}/"
    assert status_of(node) == "draining"


def test_drain_view_rejects_missing_csrf(staff):
    node = make_node("node-a")
    response = staff.post(f"/nodes/{node.pk}/drain/")
    assert response.status_code == 403
    assert status_of(node) == "online"


def test_actions_forbidden_to_non_staff():
    node = make_node("node-a")
    browser = Client()
    browser.force_login(make_user("viewer"))
    assert browser.get(f"/nodes/{node.pk}/drain/").status_code == 403
    assert browser.post(f"/nodes/{node.pk}/drain/").status_code == 403
    assert browser.post("/nodes/disconnect-all/").status_code == 403
    assert status_of(node) == "online"


def test_actions_send_anonymous_to_login():
    node = make_node("node-a")
    response = Client().post(f"/nodes/{node.pk}/disconnect/")
    assert response.status_code == 302
    assert response["Location"].startswith("/login/")


def test_delete_view_deletes(staff):
    model = make_model("digits", make_user("owner"))
    response = csrf_post(staff, "/models/digits/delete/")
    assert response.status_code == 302
    assert response["Location"] == "/models/"
    assert not Model.objects.filter(pk=model.pk).exists()


def test_disconnect_all_view(staff):
    make_node("node-a")
    make_node("node-b")
    page = staff.get("/nodes/disconnect-all/")
    response = csrf_post(staff, "/nodes/disconnect-all/")
    assert "Disconnect all 2 connected nodes?" in page.content.decode()
    assert response.status_code == 302
    assert Node.objects.filter(status="offline").count() == 2


def test_action_message_escapes_name(staff):
    node = make_node("<b>node</b>")
    csrf_post(staff, f"/nodes/{node.pk}/drain/")
    body = staff.get(f"/nodes/{node.pk}/").content.decode()
    assert "&lt;b&gt;node&lt;/b&gt; is draining" in body
    assert "<b>node</b>" not in body
