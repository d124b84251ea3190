"""The models REST API and the inference endpoint's checks, on real PostgreSQL."""

import json

import numpy as np
import pytest
from django.contrib.auth import get_user_model
from django.test import AsyncClient, Client
from safetensors.numpy import save

from apps.accounts.models import ApiToken
from apps.inference.models import Model
from gridsite.celery import app as celery_app
from tests.models import export_bytes

pytestmark = pytest.mark.django_db(transaction=True)

SIGNATURE = json.dumps([{"name": "input", "dtype": "float32", "shape": [None, 4]}])


@pytest.fixture(autouse=True)
def eager_celery(settings, tmp_path):
    settings.GRID = {**settings.GRID, "STAGING_DIR": tmp_path / "staging"}
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = False


def token_for(username: str, staff: bool = False) -> str:
    user = get_user_model().objects.create_user(username, is_staff=staff)
    return ApiToken.issue(user=user, name="test")[1]


@pytest.fixture
def owner():
    return token_for("owner")


@pytest.fixture
def outsider():
    return token_for("outsider")


def upload(token: str, **fields):
    from django.core.files.uploadedfile import SimpleUploadedFile

    data = {"model_id": "linear", "input_signature": SIGNATURE, "replicas": "1", "allow_remote_inference": "false"}
    data.update(fields)
    data.setdefault("file", SimpleUploadedFile("m.pt2", export_bytes()))
    return Client().post("/api/models/", data, HTTP_AUTHORIZATION=f"Bearer {token}")


def error(response) -> dict:
    return response.json()["error"]


def test_list_without_token_is_401():
    response = Client().get("/api/models/")
    assert response.status_code == 401
    assert error(response)["code"] == "unauthenticated"


def test_list_with_bad_token_is_401():
    response = Client().get("/api/models/", HTTP_AUTHORIZATION="Bearer grid_wrong")
    assert response.status_code == 401
    assert "invalid" in error(response)["message"]


def test_upload_creates_model(owner):
    response = upload(owner)
    body = response.json()
    assert response.status_code == 201
    assert body["model_id"] == "linear"
    assert body["input_signature"][0]["shape"] == [None, 4]
    assert len(body["sha256"]) == 64
    # No node is online, so placement ends at once with the reason.
    assert Model.objects.get(model_id="linear").placement_error.startswith("0 of 1 replicas ready")


def test_upload_bad_model_id_names_field(owner):
    response = upload(owner, model_id="../etc")
    assert response.status_code == 400
    assert error(response)["field"] == "model_id"


def test_upload_pickle_rejected(owner):
    from django.core.files.uploadedfile import SimpleUploadedFile

    response = upload(owner, file=SimpleUploadedFile("m.pt2", b"\x80\x04K\x01."))
    assert response.status_code == 400
    assert error(response)["code"] == "invalid_model"
    assert Model.objects.count() == 0


def test_upload_signature_mismatch_rejected(owner):
    signature = json.dumps([{"name": "pixels", "dtype": "float32", "shape": [None, 4]}])
    response = upload(owner, input_signature=signature)
    assert response.status_code == 400
    assert error(response)["field"] == "input_signature"
    assert "['input']" in error(response)["message"]


def test_second_upload_starts_new_version(owner):
    first = upload(owner).json()
    response = upload(owner)
    model = Model.objects.get(model_id="linear")
    assert response.status_code == 202
    # Celery runs eagerly here and no node is online, so the rollout ends at
    # once and the first version keeps serving.
    assert model.sha256 == first["version"]
    assert model.pending_sha256 == ""
    assert "was not rolled out" in model.placement_error


def test_upload_over_other_users_model_is_409(owner, outsider):
    upload(owner)
    response = upload(outsider)
    assert response.status_code == 409
    assert error(response)["field"] == "model_id"


def test_unknown_model_is_404(owner):
    response = Client().get("/api/models/nope/", HTTP_AUTHORIZATION=f"Bearer {owner}")
    assert response.status_code == 404
    assert "nope" in error(response)["message"]


def infer_body() -> bytes:
    return save({"input": np.zeros((2, 4), np.float32)})


async def test_infer_without_token_is_401():
    response = await AsyncClient().post("/api/models/linear/infer/", infer_body(), content_type="application/vnd.safetensors")
    assert response.status_code == 401


async def test_infer_forbidden_for_outsider(owner, outsider):
    await _aupload(owner)
    response = await AsyncClient().post(
        "/api/models/linear/infer/", infer_body(), content_type="application/vnd.safetensors", headers={"Authorization": f"Bearer {outsider}"}
    )
    assert response.status_code == 403
    assert error(response)["code"] == "forbidden"


async def test_infer_wrong_content_type_is_415(owner):
    await _aupload(owner)
    response = await AsyncClient().post(
        "/api/models/linear/infer/", b"[1, 2]", content_type="application/json", headers={"Authorization": f"Bearer {owner}"}
    )
    assert response.status_code == 415


async def test_infer_bad_timeout_is_400(owner):
    await _aupload(owner)
    response = await AsyncClient().post(
        "/api/models/linear/infer/?timeout=abc", infer_body(), content_type="application/vnd.safetensors", headers={"Authorization": f"Bearer {owner}"}
    )
    assert response.status_code == 400
    assert error(response)["field"] == "timeout"


async def test_infer_without_replica_is_503(owner):
    await _aupload(owner)
    response = await AsyncClient().post(
        "/api/models/linear/infer/", infer_body(), content_type="application/vnd.safetensors", headers={"Authorization": f"Bearer {owner}"}
    )
    assert response.status_code == 503
    assert error(response)["code"] == "no_replica"
    assert response["Retry-After"] == "5"


async def _aupload(token: str) -> None:
    from asgiref.sync import sync_to_async

    response = await sync_to_async(upload)(token)
    assert response.status_code == 201
