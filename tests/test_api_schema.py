"""The OpenAPI schema: complete, valid, and true of a live gateway (schemathesis)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from django.core.management import call_command
from django.urls import URLPattern, URLResolver, get_resolver

from tests.gateway_stack import gateway_only

pytestmark = pytest.mark.e2e

# A model row for the operations on /api/models/{model_id}/, whose id is the
# schema's example, so the examples phase reaches the views' real work.
MODEL_SETUP = """
from django.contrib.auth import get_user_model
from apps.inference.models import Model
owner = get_user_model().objects.get(username="owner")
Model.objects.create(model_id="digits-cnn", owner=owner, sha256="0" * 64, size=1,
                     input_signature=[{"name": "x", "dtype": "float32", "shape": [None, 1, 8, 8]}])
"""

# Checks that a response is a server error or breaks the schema, and that
# bad input and unlisted methods are rejected.
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_headers_conformance,response_schema_conformance,"
    "negative_data_rejection,unsupported_method"
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    # schemathesis sends hundreds of requests a minute with one token.
    tmp = tmp_path_factory.mktemp("schema")
    no_limits = {"GRID_THROTTLE_RATE": "0", "GRID_INFER_THROTTLE_RATE": "0"}
    with gateway_only(tmp, **no_limits) as (stack, token):
        stack.manage("shell", "-c", MODEL_SETUP)
        yield stack, token


def api_routes() -> set[str]:
    """Every /api/ route of the URL configuration, written as OpenAPI paths."""
    routes = set()

    def walk(patterns, prefix: str) -> None:
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, prefix + str(pattern.pattern))
            elif isinstance(pattern, URLPattern):
                routes.add("/" + prefix + str(pattern.pattern))

    walk(get_resolver().url_patterns, "")
    docs = ("/api/schema/", "/api/docs/", "/api/redoc/")
    return {
        re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route)
        for route in routes
        if route.startswith("/api/") and not route.startswith(docs)
    }


def test_schema_lists_every_api_route(gateway):
    stack, _ = gateway
    response = httpx.get(f"{stack.url}/api/schema/?format=json", timeout=30)
    paths = set(response.json()["paths"])
    missing = api_routes() - paths
    assert response.status_code == 200
    assert missing == set()


def test_schema_has_no_warnings(tmp_path):
    # --fail-on-warn turns drf-spectacular's warnings, such as a view whose
    # responses it cannot guess, into an error.
    call_command(
        "spectacular",
        "--validate",
        "--fail-on-warn",
        "--file",
        str(tmp_path / "schema.yaml"),
    )
    assert "/api/models/{model_id}/infer/" in (tmp_path / "schema.yaml").read_text()


def test_operations_document_errors(gateway):
    stack, _ = gateway
    schema = httpx.get(f"{stack.url}/api/schema/?format=json", timeout=30).json()
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            name = f"{method.upper()} {path}"
            assert {"400", "401", "403", "429"} <= statuses, name
            assert any(status.startswith("2") for status in statuses), name
            assert operation.get("summary"), name


def test_schemathesis_finds_no_failures(gateway, tmp_path):
    stack, token = gateway
    command = [
        str(Path(sys.executable).parent / "st"),
        "run",
        f"{stack.url}/api/schema/",
        "--header",
        f"Authorization: Bearer {token}",
        "--checks",
        CHECKS,
        "--max-examples",
        "25",
        "--no-shrink",
        "--workers",
        "2",
        "--seed",
        "1",
        "--request-timeout",
        "30",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    run = subprocess.run(
        command, capture_output=True, text=True, timeout=240, check=False, cwd=tmp_path
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


@pytest.mark.django_db
@pytest.mark.parametrize(("path", "marker"), [("/api/docs/", "swagger-ui"), ("/api/redoc/", "redoc")])
def test_docs_pages_render(client, path, marker):
    # The reference pages need no token, like the schema they load.
    response = client.get(path)
    assert response.status_code == 200
    assert marker in response.content.decode()
