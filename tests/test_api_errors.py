"""One JSON error shape, with the right status, for the errors Django and DRF raise."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from apps.accounts.models import ApiToken
from apps.inference.models import Model

pytestmark = pytest.mark.django_db


@pytest.fixture
def client() -> Client:
    owner = get_user_model().objects.create_user("owner")
    Model.objects.create(
        model_id="linear",
        owner=owner,
        sha256="0" * 64,
        size=1,
        input_signature=[{"name": "input", "dtype": "float32", "shape": [None, 4]}],
    )
    plain = ApiToken.issue(user=owner, name="test")[1]
    return Client(HTTP_AUTHORIZATION=f"Bearer {plain}")


def shape(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "field"}
    return body["error"]


def test_unknown_api_path_is_404(client):
    response = client.get("/api/nope/")
    error = shape(response)
    assert response.status_code == 404
    assert error["code"] == "not_found"
    assert "/api/nope/" in error["message"]


def test_unknown_page_keeps_html():
    response = Client().get("/no-such-page/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_unknown_model_names_it(client):
    response = client.get("/api/models/missing/")
    error = shape(response)
    assert response.status_code == 404
    assert "'missing'" in error["message"]


def test_missing_token_is_401():
    response = Client().get("/api/models/")
    error = shape(response)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="grid"'
    assert "Authorization: Bearer" in error["message"]


def test_wrong_method_is_405(client):
    response = client.put("/api/models/", {}, content_type="application/json")
    error = shape(response)
    assert response.status_code == 405
    assert error["code"] == "method_not_allowed"
    assert (
        error["message"] == "method PUT is not allowed on /api/models/; use GET, POST"
    )
    assert "POST" in response["Allow"]


def test_wrong_method_on_infer_is_405(client):
    response = client.get("/api/models/linear/infer/")
    error = shape(response)
    assert response.status_code == 405
    assert response["Allow"] == "POST"
    assert (
        error["message"]
        == "method GET is not allowed on /api/models/linear/infer/; use POST"
    )


def test_malformed_json_is_400(client):
    response = client.patch(
        "/api/models/linear/", '{"allow_download": tru', content_type="application/json"
    )
    error = shape(response)
    assert response.status_code == 400
    assert error["code"] == "invalid_input"
    assert error["message"].startswith(
        "the request body could not be parsed: JSON parse error"
    )


def test_json_list_is_400(client):
    response = client.patch(
        "/api/models/linear/", "[1, 2]", content_type="application/json"
    )
    error = shape(response)
    assert response.status_code == 400
    assert "dictionary" in error["message"]


def test_invalid_boolean_names_field(client):
    response = client.patch(
        "/api/models/linear/",
        {"allow_download": 1},
        content_type="application/json",
    )
    error = shape(response)
    assert response.status_code == 400
    assert error["field"] == "allow_download"
    assert error["message"] == "allow_download: must be true or false, not 1"


def test_form_patch_is_415(client):
    response = client.patch(
        "/api/models/linear/",
        "allow_download=true",
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 415
    assert shape(response)["code"] == "unsupported_media_type"


def test_json_upload_is_415(client):
    response = client.post(
        "/api/models/", {"model_id": "x"}, content_type="application/json"
    )
    error = shape(response)
    assert response.status_code == 415
    assert error["code"] == "unsupported_media_type"
    assert "application/json" in error["message"]


def test_large_json_body_is_413(client, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = '{"allow_download": true, "padding": "' + "x" * 2000 + '"}'
    response = client.patch(
        "/api/models/linear/", body, content_type="application/json"
    )
    error = shape(response)
    assert response.status_code == 413
    assert error["code"] == "payload_too_large"
    assert "DATA_UPLOAD_MAX_MEMORY_SIZE" in error["message"]
    assert Model.objects.get().allow_download is False


def test_large_form_field_is_413(client, settings):
    # Django's multipart parser raises RequestDataTooBig here, before any view
    # code runs; the 400 handler turns it into a 413 with the shape.
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = client.post(
        "/api/models/", {"model_id": "m", "input_signature": "x" * 2000}
    )
    error = shape(response)
    assert response.status_code == 413
    assert error["field"] == "body"


def test_nul_in_url_is_400(client):
    response = client.get("/api/models/?search=a%00b")
    error = shape(response)
    assert response.status_code == 400
    assert "NUL" in error["message"]


def test_nul_in_path_is_400(client):
    response = client.get("/api/models/a%00b/")
    assert response.status_code == 400
    assert shape(response)["code"] == "invalid_input"
