"""Markup in model ids and dataset tags is shown escaped on the dashboard.

The API, the admin and the agents reject such model ids and tags, but a row
can still come from an older version or a direct database write, so the
pages must not trust them. Model ids here contain no "/": the dashboard
builds URLs from them, and no model id can hold one. Node names are covered
in tests/test_dashboard_pages.py.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from django.test import Client

from apps.inference.models import InferenceJob
from apps.registry.models import Dataset
from tests.dashboard_data import (
    HOSTILE,
    make_job,
    make_model,
    make_node,
    make_user,
    place,
)

pytestmark = pytest.mark.django_db

# Markup without a slash, so it also fits in a model page's URL, and an
# attribute break-out.
IMAGE = "<img src=x onerror=alert(1)>"
QUOTE = 'x" onmouseover="alert(1)'


@pytest.fixture
def viewer():
    return make_user("viewer")


@pytest.fixture
def client(viewer):
    browser = Client()
    browser.force_login(viewer)
    return browser


@pytest.fixture
def hostile_rows(viewer):
    """A node holding models and a dataset whose ids and tags are markup."""
    node = make_node("node-a")
    for model_id in (IMAGE, QUOTE):
        model = make_model(model_id, viewer)
        place(model, node)
        make_job(model, node=node, status=InferenceJob.Status.FAILED, error_code="node_error", error="x")
    Dataset.objects.create(node=node, name="digits", tags=["digits", HOSTILE, IMAGE, QUOTE])
    return node


def raw_markup(body: str) -> list[str]:
    return [text for text in (HOSTILE, IMAGE, QUOTE) if text in body]


@pytest.mark.parametrize("path", ["/", "/models/", "/jobs/", "/search/?tags=digits", "/search/"])
def test_pages_escape_model_ids_and_tags(client, hostile_rows, path):
    response = client.get(path)

    assert response.status_code == 200
    assert raw_markup(response.content.decode()) == []


def test_models_page_shows_escaped_ids(client, hostile_rows):
    body = client.get("/models/").content.decode()

    assert "&lt;img src=x onerror=alert(1)&gt;" in body
    assert "x&quot; onmouseover=&quot;alert(1)" in body


def test_search_shows_escaped_tags(client, hostile_rows):
    body = client.get("/search/?tags=digits").content.decode()

    assert "&lt;img src=x onerror=alert(1)&gt;" in body
    assert "x&quot; onmouseover=&quot;alert(1)" in body


def test_node_page_escapes_models_and_tags(client, hostile_rows):
    response = client.get(f"/nodes/{hostile_rows.pk}/")

    assert response.status_code == 200
    assert raw_markup(response.content.decode()) == []


@pytest.mark.parametrize("model_id", [IMAGE, QUOTE])
def test_model_page_escapes_its_id(client, hostile_rows, model_id):
    response = client.get(f"/models/{quote(model_id, safe='')}/")

    assert response.status_code == 200
    assert raw_markup(response.content.decode()) == []
