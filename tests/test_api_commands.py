"""Operator commands: tokens, nodes and models, on real PostgreSQL."""

from __future__ import annotations

import datetime as dt
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from apps.accounts.models import ApiToken
from apps.inference.models import Model
from apps.registry.models import Node
from gridsite.celery import app as celery_app

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def eager_celery():
    # Tasks run in this process, so none reaches a shared broker queue.
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = False


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def online(name: str) -> Node:
    node, _ = Node.enroll(name)
    Node.objects.filter(pk=node.pk).update(status=Node.Status.ONLINE)
    return node


# Tokens.


def test_createtoken_with_scopes_and_expiry():
    plain = run(
        "createtoken",
        "alice",
        "--create-user",
        "--scopes",
        "read,infer",
        "--expires-in",
        "2",
    ).strip()
    token = ApiToken.objects.get()
    remaining = token.expires - timezone.now()
    assert plain.startswith("grid_")
    assert token.scopes == ["read", "infer"]
    assert dt.timedelta(days=1, hours=23) < remaining <= dt.timedelta(days=2)


def test_createtoken_rejects_unknown_scope():
    with pytest.raises(CommandError, match="unknown scopes"):
        run("createtoken", "alice", "--create-user", "--scopes", "read,write")


def test_listtokens_never_prints_token():
    plain = run("createtoken", "alice", "--create-user", "--name", "laptop").strip()
    out = run("listtokens")
    assert plain[:12] in out
    assert plain not in out
    assert "laptop" in out
    assert "active" in out


def test_revoketoken_by_prefix_blocks_api():
    plain = run("createtoken", "alice", "--create-user").strip()
    out = run("revoketoken", plain[:12])
    response = Client().get("/api/models/", HTTP_AUTHORIZATION=f"Bearer {plain}")
    assert f"revoked {plain[:12]}" in out
    assert ApiToken.objects.get().revoked is not None
    assert response.status_code == 401


def test_revoketoken_by_full_token():
    plain = run("createtoken", "alice", "--create-user").strip()
    run("revoketoken", plain)
    assert ApiToken.objects.get().revoked is not None


def test_revoketoken_by_user():
    run("createtoken", "alice", "--create-user")
    run("createtoken", "alice")
    run("createtoken", "bob", "--create-user")
    out = run("revoketoken", "--user", "alice")
    revoked = {
        token.user.username: token.revoked is not None
        for token in ApiToken.objects.select_related("user")
    }
    assert out.count("revoked grid_") == 2
    assert revoked == {"alice": True, "bob": False}


def test_revoketoken_ambiguous_prefix():
    run("createtoken", "alice", "--create-user")
    run("createtoken", "alice")
    with pytest.raises(CommandError, match="2 active tokens start with 'grid_'"):
        run("revoketoken", "grid_")


def test_listtokens_shows_revoked_state():
    plain = run("createtoken", "alice", "--create-user").strip()
    run("revoketoken", plain[:12])
    active = run("listtokens", "--active")
    every = run("listtokens")
    assert plain[:12] not in active
    assert "revoked" in every


# Nodes.


def test_nodes_list_shows_status():
    online("node-a")
    Node.enroll("node-b")
    lines = run("nodes", "list").splitlines()
    assert lines[0].split()[:3] == ["ID", "NAME", "STATUS"]
    assert lines[1].split()[1:3] == ["node-a", "online"]
    assert lines[2].split()[1:3] == ["node-b", "offline"]


def test_nodes_drain_and_undrain():
    node = online("node-a")
    drained = run("nodes", "drain", "node-a")
    status_drained = Node.objects.get(pk=node.pk).status
    again = run("nodes", "drain", "node-a")
    undrained = run("nodes", "undrain", "node-a")
    # No agent socket is open for the node, so it comes back as offline.
    status_after = Node.objects.get(pk=node.pk).status
    assert "is draining" in drained
    assert status_drained == "draining"
    assert "already draining" in again
    assert "back in service as offline" in undrained
    assert status_after == "offline"


def test_nodes_drain_offline_fails():
    Node.enroll("node-a")
    with pytest.raises(CommandError, match="node node-a is offline"):
        run("nodes", "drain", "node-a")


def test_nodes_unknown_name_fails():
    with pytest.raises(CommandError, match="node 'node-z' not found"):
        run("nodes", "drain", "node-z")


@pytest.mark.django_db(transaction=True)
def test_nodes_disconnect_marks_offline():
    node = online("node-a")
    out = run("nodes", "disconnect", "node-a")
    assert "marked offline" in out
    assert Node.objects.get(pk=node.pk).status == "offline"


@pytest.mark.django_db(transaction=True)
def test_nodes_disconnect_all():
    online("node-a")
    online("node-b")
    out = run("nodes", "disconnect", "--all")
    assert "asked 2 nodes to disconnect" in out
    assert set(Node.objects.values_list("status", flat=True)) == {"offline"}


# Models.


def test_models_list_and_delete():
    owner = get_user_model().objects.create_user("alice")
    signature = [{"name": "x", "dtype": "float32", "shape": [None, 4]}]
    Model.objects.create(
        model_id="linear",
        owner=owner,
        sha256="0" * 64,
        size=123,
        input_signature=signature,
        replicas=2,
    )
    listing = run("models", "list").splitlines()
    out = run("models", "delete", "linear")
    assert listing[1].split() == ["linear", "alice", "placing", "0/2", "123", "no"]
    assert "deleted model linear" in out
    assert not Model.objects.exists()


def test_models_delete_unknown_fails():
    with pytest.raises(CommandError, match="model 'nope' not found"):
        run("models", "delete", "nope")
