"""The Django admin for Grid's models: pages, read-only hashes and the operator actions."""

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from apps.accounts.models import ApiToken
from apps.inference.models import InferenceJob, Model
from apps.registry.models import Dataset, Node
from gridsite.celery import app as celery_app
from tests.dashboard_data import HOSTILE, make_job, make_model, make_node, place

pytestmark = pytest.mark.django_db(transaction=True)

ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
CHANGELISTS = [
    "/admin/registry/node/",
    "/admin/registry/dataset/",
    "/admin/inference/model/",
    "/admin/inference/placement/",
    "/admin/inference/inferencejob/",
    "/admin/accounts/apitoken/",
]


@pytest.fixture(autouse=True)
def eager_celery(settings, tmp_path):
    settings.GRID = {**settings.GRID, "STAGING_DIR": tmp_path / "staging"}
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = False


@pytest.fixture
def admin_user():
    return get_user_model().objects.create_superuser(
        "root", password="a long admin password"
    )


@pytest.fixture
def admin(admin_user):
    browser = Client()
    browser.force_login(admin_user)
    return browser


@pytest.fixture
def rows(admin_user):
    """One row of every model, named with a script tag where a name is free text."""
    node = make_node(HOSTILE)
    Dataset.objects.create(node=node, name=HOSTILE, tags=["digits"])
    model = make_model("digits", admin_user)
    place(model, node)
    make_job(
        model,
        node=node,
        status=InferenceJob.Status.FAILED,
        error_code="node_error",
        error=HOSTILE,
    )
    ApiToken.issue(user=admin_user, name=HOSTILE)
    return node, model


@pytest.mark.parametrize("path", CHANGELISTS)
def test_changelist_escapes(admin, rows, path):
    response = admin.get(path)
    body = response.content.decode()
    assert response.status_code == 200
    assert HOSTILE not in body


@pytest.mark.parametrize(
    "path",
    ["/admin/registry/node/", "/admin/registry/dataset/", "/admin/accounts/apitoken/"],
)
def test_changelist_shows_escaped_name(admin, rows, path):
    assert ESCAPED in admin.get(path).content.decode()


def test_changelist_filters_and_search(admin, rows):
    make_node("node-b", Node.Status.OFFLINE)
    offline = admin.get("/admin/registry/node/?status__exact=offline")
    found = admin.get("/admin/registry/node/?q=node-b")
    assert [n.name for n in offline.context["cl"].result_list] == ["node-b"]
    assert [n.name for n in found.context["cl"].result_list] == ["node-b"]


def test_dataset_search_matches_tag(admin, rows):
    response = admin.get("/admin/registry/dataset/?q=digits")
    assert len(response.context["cl"].result_list) == 1


def test_node_hash_read_only(admin, rows):
    node, _ = rows
    body = admin.get(f"/admin/registry/node/{node.pk}/change/").content.decode()
    assert node.token_hash in body
    assert 'name="token_hash"' not in body


def test_model_hash_read_only(admin, rows):
    _, model = rows
    body = admin.get(f"/admin/inference/model/{model.pk}/change/").content.decode()
    assert model.sha256 in body
    assert 'name="sha256"' not in body


def test_token_hash_read_only(admin, rows):
    token = ApiToken.objects.get()
    body = admin.get(f"/admin/accounts/apitoken/{token.pk}/change/").content.decode()
    assert token.token_hash in body
    assert 'name="token_hash"' not in body


def test_node_add_disabled(admin):
    assert admin.get("/admin/registry/node/add/").status_code == 403


def test_drain_action(admin):
    node = make_node("node-a")
    response = admin.post(
        "/admin/registry/node/", {"action": "drain", "_selected_action": [node.pk]}
    )
    assert response.status_code == 302
    assert Node.objects.get(pk=node.pk).status == "draining"


def test_disconnect_action(admin):
    online, draining = make_node("node-a"), make_node("node-b", Node.Status.DRAINING)
    admin.post(
        "/admin/registry/node/",
        {"action": "disconnect", "_selected_action": [online.pk, draining.pk]},
    )
    assert set(Node.objects.values_list("status", flat=True)) == {"offline"}


def test_replace_action(admin, rows):
    _, model = rows
    Node.objects.update(status=Node.Status.OFFLINE)
    admin.post(
        "/admin/inference/model/", {"action": "replace", "_selected_action": [model.pk]}
    )
    model.refresh_from_db()
    assert model.placement_error.startswith("0 of 1 replicas ready")


def test_bulk_delete_replaced(admin, rows):
    actions = (
        admin.get("/admin/inference/model/")
        .context["action_form"]
        .fields["action"]
        .choices
    )
    names = [name for name, _ in actions]
    assert "delete_selected" not in names
    assert "delete_and_evict" in names


def test_delete_action_removes_model(admin, rows):
    _, model = rows
    admin.post(
        "/admin/inference/model/",
        {"action": "delete_and_evict", "_selected_action": [model.pk]},
    )
    assert not Model.objects.filter(pk=model.pk).exists()


def test_revoke_action(admin, rows):
    token = ApiToken.objects.get()
    admin.post(
        "/admin/accounts/apitoken/",
        {"action": "revoke", "_selected_action": [token.pk]},
    )
    token.refresh_from_db()
    assert token.revoked is not None


def test_admin_needs_staff():
    browser = Client()
    browser.force_login(get_user_model().objects.create_user("viewer"))
    response = browser.get("/admin/registry/node/")
    assert response.status_code == 302
