"""The pieces that let the gateway recover from faults, on real PostgreSQL and Redis.

The end-to-end fault tests (test_faults_nodes, test_faults_services) show
these at work with real processes. Here each one is tested alone, with the
timing under the test's control.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

import numpy as np
import pytest
import redis
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.db import OperationalError
from django.test import AsyncClient, Client
from django.utils import timezone
from safetensors.numpy import save

from apps.accounts.models import ApiToken
from apps.inference import views_infer
from apps.inference.models import InferenceJob, Model, Placement
from apps.inference.services import placement
from apps.inference.tasks import node_lost
from apps.inference.views import ModelListView
from apps.registry import presence, services
from apps.registry.models import Node

pytestmark = pytest.mark.django_db
# For tests whose code queries the database from another thread, which reads
# only committed rows.
committed = pytest.mark.django_db(transaction=True)

LONG_AGO = dt.timedelta(hours=1)


@pytest.fixture
def user():
    return get_user_model().objects.create_user("owner")


@pytest.fixture
def token(user) -> str:
    return ApiToken.issue(user=user, name="test")[1]


@pytest.fixture
def node():
    enrolled, _ = Node.enroll("node-a")
    Node.objects.filter(pk=enrolled.pk).update(status=Node.Status.ONLINE)
    yield enrolled
    presence.forget_heartbeat(enrolled.pk)


def make_model(user, model_id: str = "tiny", *, age: dt.timedelta = LONG_AGO, **fields) -> Model:
    model = Model.objects.create(
        model_id=model_id,
        owner=user,
        sha256=f"{model_id:a<64}"[:64],
        size=10,
        input_signature=[{"name": "input", "dtype": "float32", "shape": [None, 4]}],
        **fields,
    )
    Model.objects.filter(pk=model.pk).update(created=timezone.now() - age)
    return model


# The node sweep and a reconnect racing it.


def test_reconnected_node_not_stale(node):
    now = time.time()
    async_to_sync(presence.record_heartbeat)(node.pk, 0, now - 60)
    Node.objects.filter(pk=node.pk).update(connected_since=timezone.now())

    assert services.stale_node_ids(now) == []


def test_silent_node_is_stale(node):
    now = time.time()
    async_to_sync(presence.record_heartbeat)(node.pk, 0, now - 60)
    Node.objects.filter(pk=node.pk).update(connected_since=timezone.now() - LONG_AGO)

    assert services.stale_node_ids(now) == [node.pk]


def test_sweep_spares_node_that_reconnected(node):
    sweep_started = timezone.now()
    Node.objects.filter(pk=node.pk).update(connected_since=sweep_started + dt.timedelta(milliseconds=5))

    taken = node_lost(node.pk, "heartbeats stopped", connected_before=sweep_started)

    assert taken is False
    assert Node.objects.get(pk=node.pk).status == "online"


@committed
def test_sweep_takes_silent_node_offline(node):
    Node.objects.filter(pk=node.pk).update(connected_since=timezone.now() - LONG_AGO)

    taken = node_lost(node.pk, "heartbeats stopped", connected_before=timezone.now())

    assert taken is True
    assert Node.objects.get(pk=node.pk).status == "offline"


# Presence lost in a Redis restart.


@committed
async def test_heartbeat_restores_lost_presence(node):
    restored = await presence.record_live_heartbeat(node.pk, "channel-new", 2)

    assert restored is True
    assert await presence.presence_of(node.pk) == "channel-new"
    await presence.release_presence(node.pk, "channel-new")


@committed
async def test_heartbeat_keeps_newer_socket(node):
    await presence.claim_presence(node.pk, "channel-newer")

    restored = await presence.record_live_heartbeat(node.pk, "channel-old", 0)

    assert restored is False
    assert await presence.presence_of(node.pk) == "channel-newer"
    await presence.release_presence(node.pk, "channel-newer")


# Placement tasks lost with a worker.


def test_model_without_placements_found(user):
    model = make_model(user)

    assert placement.models_never_placed(created_before=timezone.now()) == [model.pk]


def test_new_upload_not_yet_swept(user):
    make_model(user, age=dt.timedelta(0))

    assert placement.models_never_placed(created_before=timezone.now() - dt.timedelta(seconds=60)) == []


def test_placed_model_not_listed(user, node):
    model = make_model(user)
    Placement.objects.create(model=model, node=node, sha256=model.sha256, status=Placement.Status.FAILED)

    assert placement.models_never_placed(created_before=timezone.now()) == []


def test_failed_placement_not_listed(user):
    make_model(user, placement_error="0 of 1 replicas ready; 0 online nodes")

    assert placement.models_never_placed(created_before=timezone.now()) == []


def test_unstarted_rollout_found(user, node):
    model = make_model(user, pending_sha256="b" * 64, pending_size=10)
    Placement.objects.create(model=model, node=node, sha256=model.sha256, status=Placement.Status.READY)

    assert placement.models_never_placed(created_before=timezone.now()) == [model.pk]


# A job.done message lost on the way to the waiting request.


@committed
async def test_wait_reads_row_when_notice_lost(settings, user, node):
    settings.GRID = {**settings.GRID, "ATTEMPT_TIMEOUT": 0.2}
    model = await asyncio.to_thread(make_model, user)
    job = await InferenceJob.objects.acreate(
        id=uuid.uuid4(),
        model=model,
        node=node,
        status=InferenceJob.Status.FAILED,
        attempts=2,
        error_code="no_replica",
        error="no other ready replica",
        deadline=timezone.now() + dt.timedelta(seconds=30),
    )
    never = asyncio.get_running_loop().create_future()
    started = time.monotonic()

    message = await views_infer._wait(str(job.pk), never, started + 10)

    assert time.monotonic() - started < 2
    assert message["status"] == "failed"
    assert message["error_code"] == "no_replica"
    assert message["attempts"] == 2


# 503 naming the service.


def infer_body() -> bytes:
    return save({"input": np.zeros((2, 4), np.float32)})


@committed
async def test_async_view_database_error_is_503(monkeypatch, token):
    def unreachable(*args, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(views_infer, "_authorize", unreachable)

    response = await AsyncClient().post(
        "/api/models/tiny/infer/", infer_body(), content_type="application/vnd.safetensors", headers={"Authorization": f"Bearer {token}"}
    )

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "database_unavailable"
    assert "PostgreSQL" in response.json()["error"]["message"]
    assert response["Retry-After"] == "5"


def test_rest_view_redis_error_is_503(monkeypatch, token):
    def unreachable(*args, **kwargs):
        raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379")

    monkeypatch.setattr(ModelListView, "get", unreachable)

    response = Client().get("/api/models/", HTTP_AUTHORIZATION=f"Bearer {token}")

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "redis_unavailable"
    assert "Redis" in response.json()["error"]["message"]
    assert response["Retry-After"] == "5"


def test_other_errors_stay_500(monkeypatch, token):
    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(ModelListView, "get", broken)

    response = Client(raise_request_exception=False).get("/api/models/", HTTP_AUTHORIZATION=f"Bearer {token}")

    assert response.status_code == 500
    assert response.json()["error"]["code"] == "server_error"
