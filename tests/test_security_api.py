"""Unauthenticated and malformed calls to every API route, on real PostgreSQL.

The routes are read from the URL configuration, so a route added later is
checked without editing this file. Permission rules per user and scope are
in tests/test_api_auth.py.
"""

from __future__ import annotations

import uuid

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from apps.accounts.models import ApiToken
from tests.dashboard_data import make_model, make_node, place

pytestmark = pytest.mark.django_db

# Routes that are public on purpose: the OpenAPI schema and its viewers.
PUBLIC = {"api/schema/", "api/docs/", "api/redoc/"}
ARGUMENTS = {"<str:model_id>": "digits", "<uuid:job_id>": str(uuid.uuid4()), "<int:node_id>": "1"}
# Query strings a route checks before the token. They leak nothing, but
# without them the route returns 400 before it gets to authentication.
QUERIES = {"/api/jobs/": "?model=digits"}
DEEP_JSON = "[" * 60_000


def api_routes() -> list[str]:
    """Every route under api/ with its parameters filled in, except the public ones."""
    routes = []

    def walk(patterns, prefix: str) -> None:
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, prefix + str(pattern.pattern))
            elif isinstance(pattern, URLPattern):
                route = prefix + str(pattern.pattern)
                if route.startswith("api/") and route not in PUBLIC:
                    for placeholder, value in ARGUMENTS.items():
                        route = route.replace(placeholder, value)
                    routes.append("/" + route)

    walk(get_resolver().url_patterns, "")
    return routes


@pytest.fixture
def token() -> str:
    user = get_user_model().objects.create_user("owner", is_staff=True)
    return ApiToken.issue(user=user, name="test")[1]


@pytest.fixture
def model(token):
    owner = get_user_model().objects.get(username="owner")
    served = make_model("digits", owner)
    place(served, make_node("node-a"))
    return served


def test_routes_found():
    routes = api_routes()

    assert "/api/models/digits/infer/" in routes
    assert "/api/nodes/disconnect/" in routes
    assert len(routes) >= 14


@pytest.mark.parametrize("route", api_routes())
def test_route_needs_token(route):
    client = Client(raise_request_exception=False)
    url = route + QUERIES.get(route, "")
    statuses = {method: getattr(client, method)(url).status_code for method in ("get", "post", "patch", "delete")}

    assert [method for method, status in statuses.items() if status < 400] == []
    assert 401 in statuses.values()
    assert [method for method, status in statuses.items() if status >= 500] == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "header",
    ["Bearer", "Bearer ", "Basic b3duZXI6cGFzcw==", "Bearer " + "x" * 10_000, "bearer grid_notatoken", "Token grid_x"],
)
def test_malformed_authorization_is_401(header):
    client = Client(raise_request_exception=False)
    listing = client.get("/api/models/", HTTP_AUTHORIZATION=header)
    inference = client.post("/api/models/digits/infer/", b"", content_type="application/vnd.safetensors", HTTP_AUTHORIZATION=header)

    assert listing.status_code == 401
    assert inference.status_code == 401


def test_deeply_nested_json_patch_is_400(model, token):
    response = Client(raise_request_exception=False).patch(
        "/api/models/digits/", DEEP_JSON, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}"
    )

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_input"
    assert "nested too deeply" in response.json()["error"]["message"]


# The view is async and queries from another thread, which reads only committed rows.
@pytest.mark.django_db(transaction=True)
def test_deeply_nested_dataset_request_is_400(model, token):
    response = Client(raise_request_exception=False).post(
        "/api/models/digits/infer-dataset/", DEEP_JSON, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}"
    )

    assert response.status_code == 400
    assert response.json()["error"]["field"] == "body"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", "model_id=x"),
        ("application/xml", "<model/>"),
        ("application/json; charset=utf-16", '{"allow_download": true}'),
        ("application/json", b'{"allow_download": "\xff"}'),
        ("multipart/form-data; boundary=", "--\r\n"),
    ],
)
def test_wrong_content_type_on_patch_rejected(model, token, content_type, body):
    response = Client(raise_request_exception=False).patch(
        "/api/models/digits/", body, content_type=content_type, HTTP_AUTHORIZATION=f"Bearer {token}"
    )

    assert response.status_code in (400, 415)
    assert response.json()["error"]["code"] in ("invalid_input", "unsupported_media_type")
