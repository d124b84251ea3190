"""Dashboard pages through Django's test client, on real PostgreSQL and Redis."""

import pytest
from django.test import Client

from apps.inference.models import InferenceJob
from apps.registry.models import Dataset, Node
from tests.dashboard_data import (
    HOSTILE,
    PASSWORD,
    make_job,
    make_model,
    make_node,
    make_user,
    place,
)

pytestmark = pytest.mark.django_db

ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
PAGES = ["/", "/nodes/", "/models/", "/jobs/", "/search/"]


@pytest.fixture
def viewer():
    return make_user("viewer")


@pytest.fixture
def client(viewer):
    browser = Client()
    browser.force_login(viewer)
    return browser


@pytest.fixture
def hostile(viewer):
    """A node, dataset, model and job whose texts are script tags."""
    node = make_node(HOSTILE)
    Dataset.objects.create(
        node=node, name=HOSTILE, tags=["digits"], description=HOSTILE
    )
    model = make_model("digits", viewer)
    place(model, node)
    make_job(
        model,
        node=node,
        status=InferenceJob.Status.FAILED,
        error_code="node_error",
        error=HOSTILE,
    )
    node.verification_mismatches = [
        {"model_id": HOSTILE, "detail": HOSTILE, "at": "2026-01-01T00:00:00Z"}
    ]
    node.save(update_fields=["verification_mismatches"])
    return node


@pytest.mark.parametrize("path", PAGES)
def test_page_needs_login(path):
    response = Client().get(path)
    assert response.status_code == 302
    assert response["Location"].startswith("/login/?next=")


def test_login_page_logs_in(viewer):
    browser = Client()
    page = browser.get("/login/")
    response = browser.post(
        "/login/", {"username": "viewer", "password": PASSWORD, "next": "/nodes/"}
    )
    assert page.status_code == 200
    assert response.status_code == 302
    assert response["Location"] == "/nodes/"
    assert browser.get("/nodes/").status_code == 200


def test_login_rejects_wrong_password(viewer):
    response = Client().post("/login/", {"username": "viewer", "password": "wrong"})
    assert response.status_code == 200
    assert b"Please enter a correct username and password" in response.content


@pytest.mark.parametrize("path", PAGES)
def test_pages_escape_hostile_names(client, hostile, path):
    response = client.get(
        path + ("?tags=digits&include_offline=on" if path == "/search/" else "")
    )
    body = response.content.decode()
    assert response.status_code == 200
    assert HOSTILE not in body


@pytest.mark.parametrize(
    "path", ["/nodes/", "/jobs/", "/search/?tags=digits&include_offline=on"]
)
def test_pages_show_escaped_text(client, hostile, path):
    body = client.get(path).content.decode()
    assert ESCAPED in body


def test_node_detail_escapes_everything(client, hostile):
    response = client.get(f"/nodes/{hostile.pk}/")
    body = response.content.decode()
    assert response.status_code == 200
    assert HOSTILE not in body
    assert body.count(ESCAPED) >= 4


def test_model_detail_escapes_node_name(client, hostile):
    body = client.get("/models/digits/").content.decode()
    assert HOSTILE not in body
    assert ESCAPED in body


def test_overview_counts(client, viewer):
    online = make_node("node-a")
    make_node("node-b", Node.Status.OFFLINE)
    make_node("node-c", Node.Status.DRAINING)
    healthy = make_model("healthy", viewer)
    place(healthy, online)
    make_model("unavailable", viewer)
    response = client.get("/")
    summary = response.context["summary"]
    assert summary.nodes == {"online": 1, "offline": 1, "draining": 1}
    assert summary.models == {"healthy": 1, "degraded": 0, "unavailable": 1}


def test_fragment_renders_region_only(client):
    make_node("node-a")
    response = client.get("/nodes/?fragment=1")
    body = response.content.decode()
    assert response["X-Grid-Fragment"] == "1"
    assert "<html" not in body
    assert 'data-node-status="' in body


def test_fragment_of_logged_out_user_redirects():
    response = Client().get("/nodes/?fragment=1")
    assert response.status_code == 302
    assert "X-Grid-Fragment" not in response


def test_jobs_filter_by_status_and_node(client, viewer):
    node_a, node_b = make_node("node-a"), make_node("node-b")
    model = make_model("digits", viewer)
    make_job(
        model, node=node_a, status=InferenceJob.Status.FAILED, error_code="timeout"
    )
    make_job(
        model, node=node_b, status=InferenceJob.Status.FAILED, error_code="node_error"
    )
    make_job(model, node=node_a)
    response = client.get(f"/jobs/?status=failed&node={node_a.pk}")
    jobs = list(response.context["page"].object_list)
    assert len(jobs) == 1
    assert jobs[0].error_code == "timeout"


def test_jobs_filter_failovers_only(client, viewer):
    model = make_model("digits", viewer)
    make_job(model, attempts=1)
    moved = make_job(model, attempts=3)
    response = client.get("/jobs/?failovers=on")
    jobs = list(response.context["page"].object_list)
    assert [job.pk for job in jobs] == [moved.pk]
    assert "<td>2</td>" in response.content.decode()


def test_jobs_unknown_model_shows_error(client):
    response = client.get("/jobs/?model=nope")
    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode()


def test_search_finds_tagged_dataset(client):
    online = make_node("node-a")
    offline = make_node("node-b", Node.Status.OFFLINE)
    Dataset.objects.create(node=online, name="train", tags=["digits", "train"])
    Dataset.objects.create(node=offline, name="test", tags=["digits", "test"])
    found = client.get("/search/?tags=digits").context["datasets"]
    everywhere = client.get("/search/?tags=digits&include_offline=on").context[
        "datasets"
    ]
    assert [d.name for d in found] == ["train"]
    assert sorted(d.name for d in everywhere) == ["test", "train"]


def test_search_rejects_invalid_tag(client):
    response = client.get("/search/?tags=ok,bad%20tag")
    assert response.context["datasets"] is None
    assert "Tag &#x27;bad tag&#x27; is invalid" in response.content.decode()


def test_search_lists_tags_in_use(client):
    node = make_node("node-a")
    Dataset.objects.create(node=node, name="a", tags=["digits", "train"])
    Dataset.objects.create(node=node, name="b", tags=["digits"])
    response = client.get("/search/")
    assert response.context["tags"] == [("digits", 2), ("train", 1)]


def test_model_page_shows_health_and_rate(client, viewer):
    node_a, node_b = make_node("node-a"), make_node("node-b", Node.Status.OFFLINE)
    model = make_model("digits", viewer, replicas=2)
    place(model, node_a)
    place(model, node_b)
    for _ in range(6):
        make_job(model, node=node_a)
    row = client.get("/models/").context["rows"][0]
    assert row.health == "degraded"
    assert row.ready == 1
    assert row.rate == pytest.approx(0.1)


def test_unknown_model_is_404(client):
    assert client.get("/models/nope/").status_code == 404


def test_static_files_exist():
    from django.contrib.staticfiles import finders

    assert finders.find("dashboard/dashboard.js") is not None
    assert finders.find("dashboard/dashboard.css") is not None
