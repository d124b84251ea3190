"""Who may do what: tokens, scopes, owners and staff, through the real API views."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from django.contrib.auth import get_user_model
from django.test import AsyncClient, Client
from django.utils import timezone
from safetensors.numpy import save

from apps.accounts.models import ApiToken
from apps.inference.models import Model
from apps.registry.models import Node
from gridsite.celery import app as celery_app

pytestmark = pytest.mark.django_db
# The async views read the database from another thread, so their tests need
# committed rows.
committed = pytest.mark.django_db(transaction=True)

SIGNATURE = [{"name": "input", "dtype": "float32", "shape": [None, 4]}]
SAFETENSORS = "application/vnd.safetensors"


@pytest.fixture(autouse=True)
def eager_celery():
    # Tasks run in this process, so none reaches a shared broker queue.
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = False


def user(name: str, staff: bool = False):
    return get_user_model().objects.create_user(name, is_staff=staff)


def token(owner, scopes: list[str] | None = None, **fields) -> str:
    return ApiToken.issue(user=owner, name="test", scopes=scopes, **fields)[1]


def auth(plain: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {plain}"}


def error(response) -> dict:
    return response.json()["error"]


@pytest.fixture
def alice():
    return user("alice")


@pytest.fixture
def model(alice):
    return Model.objects.create(
        model_id="linear",
        owner=alice,
        sha256="0" * 64,
        size=1,
        input_signature=SIGNATURE,
    )


def patch(plain: str, model_id: str = "linear", **body):
    return Client().patch(
        f"/api/models/{model_id}/", body, content_type="application/json", **auth(plain)
    )


def delete(plain: str, model_id: str = "linear"):
    return Client().delete(f"/api/models/{model_id}/", **auth(plain))


# Tokens.


def test_expired_token_is_401(alice):
    plain = token(alice, expires=timezone.now() - dt.timedelta(seconds=1))
    response = Client().get("/api/models/", **auth(plain))
    assert response.status_code == 401
    assert error(response)["code"] == "unauthenticated"
    assert "expired at" in error(response)["message"]


def test_token_before_expiry_works(alice):
    plain = token(alice, expires=timezone.now() + dt.timedelta(hours=1))
    response = Client().get("/api/models/", **auth(plain))
    assert response.status_code == 200


def test_revoked_token_is_401(alice):
    plain = token(alice)
    ApiToken.objects.update(revoked=timezone.now())
    response = Client().get("/api/models/", **auth(plain))
    assert response.status_code == 401
    assert "was revoked at" in error(response)["message"]


@committed
async def test_revoked_token_cannot_infer(model):
    plain = await token_async(model)
    await ApiToken.objects.aupdate(revoked=timezone.now())
    response = await infer(plain)
    assert response.status_code == 401
    assert "was revoked at" in error(response)["message"]


def test_node_token_is_not_an_api_token():
    _, node_token = Node.enroll("node-a")
    response = Client().get("/api/nodes/", **auth(node_token))
    assert response.status_code == 401
    assert "node token" in error(response)["message"]


def test_inactive_user_is_401(alice):
    plain = token(alice)
    get_user_model().objects.filter(pk=alice.pk).update(is_active=False)
    response = Client().get("/api/models/", **auth(plain))
    assert response.status_code == 401
    assert "inactive" in error(response)["message"]


def test_last_used_written_once_a_minute(alice):
    plain = token(alice)
    Client().get("/api/models/", **auth(plain))
    first = ApiToken.objects.get().last_used
    Client().get("/api/models/", **auth(plain))
    second = ApiToken.objects.get().last_used
    ApiToken.objects.update(last_used=first - dt.timedelta(minutes=2))
    Client().get("/api/models/", **auth(plain))
    third = ApiToken.objects.get().last_used
    assert first is not None
    assert second == first
    assert third > first


def test_session_login_needs_no_scopes(alice):
    client = Client()
    client.force_login(alice)
    response = client.get("/api/models/")
    assert response.status_code == 200


# Scopes.


def test_get_needs_read_scope(alice):
    response = Client().get("/api/models/", **auth(token(alice, ["infer"])))
    assert response.status_code == 403
    assert error(response)["code"] == "missing_scope"
    assert "'read'" in error(response)["message"]


def test_read_scope_allows_get(alice):
    response = Client().get("/api/nodes/", **auth(token(alice, ["read"])))
    assert response.status_code == 200


def test_upload_needs_serve_scope(alice):
    response = Client().post(
        "/api/models/", {"model_id": "x"}, **auth(token(alice, ["read", "infer"]))
    )
    assert response.status_code == 403
    assert error(response)["code"] == "missing_scope"
    assert "'serve'" in error(response)["message"]


def test_patch_needs_serve_scope(model, alice):
    response = patch(token(alice, ["read"]), allow_download=True)
    assert response.status_code == 403
    assert error(response)["code"] == "missing_scope"


def test_delete_needs_serve_scope(model, alice):
    response = delete(token(alice, ["read", "infer"]))
    assert response.status_code == 403
    assert error(response)["code"] == "missing_scope"
    assert Model.objects.filter(model_id="linear").exists()


def test_disconnect_needs_admin_scope():
    staff = user("root", staff=True)
    response = Client().post(
        "/api/nodes/disconnect/", **auth(token(staff, ["read", "serve", "infer"]))
    )
    assert response.status_code == 403
    assert error(response)["code"] == "missing_scope"
    assert "'admin'" in error(response)["message"]


@committed
async def test_infer_needs_infer_scope(model):
    plain = await token_async(model, ["read", "serve"])
    response = await infer(plain)
    assert response.status_code == 403
    assert error(response)["code"] == "missing_scope"
    assert "'infer'" in error(response)["message"]


@committed
def test_job_needs_read_scope(alice):
    response = Client().get(
        "/api/jobs/5b0e0c1e-9a7e-4d0b-8c53-0f4b1a7e2d11/",
        **auth(token(alice, ["infer"])),
    )
    assert response.status_code == 403
    assert error(response)["code"] == "missing_scope"


# Owners, other users and staff.


def test_owner_can_update(model, alice):
    response = patch(token(alice), allow_remote_inference=True)
    assert response.status_code == 200
    assert response.json()["allow_remote_inference"] is True
    assert Model.objects.get().allow_remote_inference is True


def test_other_user_cannot_update(model):
    response = patch(token(user("mallory")), allow_remote_inference=True)
    assert response.status_code == 403
    assert error(response)["code"] == "forbidden"
    assert Model.objects.get().allow_remote_inference is False


def test_staff_can_update(model):
    response = patch(token(user("root", staff=True)), allow_download=True)
    assert response.status_code == 200
    assert Model.objects.get().allow_download is True


def test_update_rejects_other_fields(model, alice):
    response = patch(token(alice), replicas=3)
    assert response.status_code == 400
    assert error(response)["field"] == "replicas"
    assert "cannot be changed" in error(response)["message"]


def test_owner_can_delete(model, alice):
    response = delete(token(alice))
    assert response.status_code == 204
    assert not Model.objects.exists()


def test_other_user_cannot_delete(model):
    response = delete(token(user("mallory")))
    assert response.status_code == 403
    assert Model.objects.exists()


def test_staff_can_delete(model):
    response = delete(token(user("root", staff=True)))
    assert response.status_code == 204
    assert not Model.objects.exists()


@committed
async def test_other_user_cannot_infer_private_model(model):
    response = await infer(await token_async(model, owner="mallory"))
    assert response.status_code == 403
    assert error(response)["code"] == "forbidden"


@committed
async def test_other_user_can_infer_remote_model(model):
    await Model.objects.aupdate(allow_remote_inference=True)
    response = await infer(await token_async(model, owner="mallory"))
    # Allowed: the request reaches dispatch, which finds no node online.
    assert response.status_code == 503
    assert error(response)["code"] == "no_replica"


@committed
async def test_owner_can_infer_private_model(model):
    response = await infer(await token_async(model))
    assert response.status_code == 503
    assert error(response)["code"] == "no_replica"


def test_non_staff_cannot_disconnect_nodes(alice):
    Node.enroll("node-a")
    Node.objects.update(status=Node.Status.ONLINE)
    response = Client().post("/api/nodes/disconnect/", **auth(token(alice)))
    assert response.status_code == 403
    assert "only staff" in error(response)["message"]
    assert Node.objects.get().status == "online"


@committed
def test_staff_disconnects_nodes():
    Node.enroll("node-a")
    Node.enroll("node-b")
    Node.objects.update(status=Node.Status.ONLINE)
    response = Client().post(
        "/api/nodes/disconnect/", **auth(token(user("root", staff=True)))
    )
    assert response.status_code == 200
    assert response.json() == {"disconnected": 2}
    assert list(Node.objects.values_list("status", flat=True)) == ["offline", "offline"]


# Helpers for the async inference view.


async def token_async(
    model: Model, scopes: list[str] | None = None, owner: str | None = None
) -> str:
    from asgiref.sync import sync_to_async

    holder = (
        await sync_to_async(user)(owner)
        if owner
        else await get_user_model().objects.aget(pk=model.owner_id)
    )
    return await sync_to_async(token)(holder, scopes)


async def infer(plain: str):
    body = save({"input": np.zeros((2, 4), np.float32)})
    headers = {"Authorization": f"Bearer {plain}"}
    return await AsyncClient().post(
        "/api/models/linear/infer/", body, content_type=SAFETENSORS, headers=headers
    )
