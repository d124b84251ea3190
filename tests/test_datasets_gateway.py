"""The gateway's side of datasets: stored reports, the consumer, and data-local checks.

Real PostgreSQL and Redis; the agent is played by Channels' WebsocketCommunicator.
"""

import asyncio
import json

import numpy as np
import pytest
import safetensors.numpy
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.test import AsyncClient

from apps.accounts.models import ApiToken
from apps.inference.models import Model, Placement
from apps.inference.services import datalocal, placement
from apps.registry.datasets import replace_node_datasets
from apps.registry.models import Dataset, Node
from gridsite.asgi import application
from gridsite.errors import ApiError

# Synchronous tests roll back; the async ones, whose ORM calls run on other
# threads, need real commits.
pytestmark = pytest.mark.django_db
committed = pytest.mark.django_db(transaction=True)

SIGNATURE = [{"name": "images", "dtype": "float32", "shape": [None, 1, 8, 8]}]


def entry(dataset: str = "digits-1", **fields) -> dict:
    report = {
        "name": dataset,
        "tags": ["Digits", "test"],
        "description": "four images",
        "tensors": {"images": {"dtype": "float32", "shape": [4, 1, 8, 8]}, "labels": {"dtype": "int64", "shape": [4]}},
        "rows": 4,
        "label_tensor": "labels",
    }
    report.update(fields)
    return report


@pytest.fixture
def enrolled():
    return Node.enroll("node-a")


# Storing reports.


def test_report_stored(enrolled):
    node, _ = enrolled
    assert replace_node_datasets(node.pk, [entry()]) == 1
    stored = Dataset.objects.get(node=node)
    assert stored.name == "digits-1"
    assert stored.tags == ["digits", "test"]
    assert stored.rows == 4
    assert stored.label_tensor == "labels"


def test_report_replaces_previous(enrolled):
    node, _ = enrolled
    replace_node_datasets(node.pk, [entry("old-1"), entry("old-2")])
    replace_node_datasets(node.pk, [entry("new")])
    assert list(Dataset.objects.filter(node=node).values_list("name", flat=True)) == ["new"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "../../etc/passwd"}, "name '../../etc/passwd' is invalid"),
        ({"tags": ["fine", "not fine"]}, "tag 'not fine' is invalid"),
        ({"tags": []}, "tags must be a list"),
        ({"rows": 5}, "every tensor must have 5 rows"),
        ({"rows": True}, "rows must be a non-negative integer"),
        ({"label_tensor": "missing"}, "label_tensor 'missing' is not one of its tensors"),
        ({"tensors": {"x": {"dtype": "complex64", "shape": [4]}}}, "unsupported dtype"),
        ({"description": "x" * 1001}, "description must be text"),
    ],
)
def test_report_invalid_entry_dropped(enrolled, caplog, fields, message):
    node, _ = enrolled
    stored = replace_node_datasets(node.pk, [entry("bad", **fields), entry("good")])
    assert stored == 1
    assert list(Dataset.objects.filter(node=node).values_list("name", flat=True)) == ["good"]
    assert message in caplog.text


def test_report_not_a_list_clears(enrolled):
    node, _ = enrolled
    replace_node_datasets(node.pk, [entry()])
    assert replace_node_datasets(node.pk, {"name": "x"}) == 0
    assert not Dataset.objects.filter(node=node).exists()


# The consumer.


HELLO = {
    "type": "hello",
    "protocol": 1,
    "name": "node-a",
    "capabilities": {"cpu_count": 2},
    "concurrency": 2,
    "models": [],
}


async def greet(token: str, datasets: list) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(application, "/ws/agent/", headers=[(b"authorization", f"Bearer {token}".encode())])
    connected, _ = await comm.connect()
    assert connected
    await comm.send_to(text_data=json.dumps({**HELLO, "datasets": datasets}))
    welcome = json.loads(await comm.receive_from(timeout=5))
    assert welcome["type"] == "welcome"
    return comm


async def stored_names(node: Node) -> list[str]:
    return [name async for name in Dataset.objects.filter(node=node).values_list("name", flat=True)]


@committed
async def test_hello_stores_datasets(enrolled):
    node, token = enrolled
    comm = await greet(token, [entry("digits-1")])
    names = await stored_names(node)
    await comm.disconnect()
    assert names == ["digits-1"]


@committed
async def test_datasets_message_replaces(enrolled):
    node, token = enrolled
    comm = await greet(token, [entry("digits-1")])
    await comm.send_to(text_data=json.dumps({"type": "datasets", "datasets": [entry("digits-2")]}))
    for _ in range(50):
        names = await stored_names(node)
        if names == ["digits-2"]:
            break
        await asyncio.sleep(0.05)
    await comm.disconnect()
    assert names == ["digits-2"]


@committed
async def test_datasets_kept_when_node_offline(enrolled):
    node, token = enrolled
    comm = await greet(token, [entry("digits-1")])
    await comm.disconnect()
    refreshed = await Node.objects.aget(pk=node.pk)
    assert refreshed.status == "offline"
    assert await stored_names(node) == ["digits-1"]


@committed
async def test_summary_for_unknown_job_ignored(enrolled, caplog):
    _, token = enrolled
    comm = await greet(token, [])
    await comm.send_to(text_data=json.dumps({"type": "infer.summary", "job_id": "not-sent", "attempt": 1, "summary": {}}))
    await asyncio.sleep(0.2)
    await comm.disconnect()
    assert "which was not sent to it; ignored" in caplog.text


# Data-local checks before anything is sent to a node.


@pytest.fixture
def owner():
    user = get_user_model().objects.create_user("owner")
    return user, ApiToken.issue(user=user, name="test")[1]


@pytest.fixture
def served(enrolled, owner, settings, tmp_path):
    settings.GRID = {**settings.GRID, "STAGING_DIR": tmp_path / "staging"}
    node, _ = enrolled
    Node.objects.filter(pk=node.pk).update(status="online")
    replace_node_datasets(node.pk, [entry("digits-1")])
    model = Model.objects.create(model_id="digits-cnn", owner=owner[0], sha256="a" * 64, size=10, input_signature=SIGNATURE, allow_remote_inference=True)
    return node, model


def test_target_found(served):
    node, model = served
    target = datalocal.find_target(model, node_id=node.pk, dataset="digits-1")
    assert target.node_name == "node-a"
    assert target.rows == 4


def test_target_unknown_dataset_404(served):
    node, model = served
    with pytest.raises(ApiError) as caught:
        datalocal.find_target(model, node_id=node.pk, dataset="nope")
    assert caught.value.status_code == 404
    assert caught.value.field == "dataset"


def test_target_offline_node_503(served):
    node, model = served
    Node.objects.filter(pk=node.pk).update(status="offline")
    with pytest.raises(ApiError) as caught:
        datalocal.find_target(model, node_id=node.pk, dataset="digits-1")
    assert caught.value.status_code == 503
    assert "is offline" in caught.value.message


def test_target_wrong_shape_400(served):
    node, model = served
    replace_node_datasets(node.pk, [entry("flat", tensors={"images": {"dtype": "float32", "shape": [4, 64]}}, label_tensor="")])
    with pytest.raises(ApiError) as caught:
        datalocal.find_target(model, node_id=node.pk, dataset="flat")
    assert caught.value.status_code == 400
    assert "does not fit model 'digits-cnn'" in caught.value.message
    assert "has 2 dimensions" in caught.value.message


def test_replica_ready_on_node(served):
    node, model = served
    Placement.objects.create(model=model, node=node, sha256=model.sha256, status="ready")
    assert datalocal.request_replica(model, node.pk) is True


def test_replica_of_old_version_not_used(served):
    node, model = served
    Placement.objects.create(model=model, node=node, sha256="b" * 64, status="ready")
    with pytest.raises(ApiError) as caught:
        datalocal.request_replica(model, node.pk)
    assert caught.value.status_code == 409


def test_replica_needs_remote_inference(served):
    node, model = served
    Model.objects.filter(pk=model.pk).update(allow_remote_inference=False)
    model.refresh_from_db()
    with pytest.raises(ApiError) as caught:
        datalocal.request_replica(model, node.pk)
    assert caught.value.status_code == 409
    assert "has no replica on node" in caught.value.message
    assert "serve the model with more replicas" in caught.value.message


def test_replica_no_copy_anywhere_409(served):
    node, model = served
    with pytest.raises(ApiError) as caught:
        datalocal.request_replica(model, node.pk)
    assert caught.value.status_code == 409
    assert "no online node holds the model to copy it from" in caught.value.message
    assert not Placement.objects.filter(model=model).exists()


def test_replica_from_staged_upload(served):
    node, model = served
    placement.staging_path(model.sha256).write_bytes(b"staged")
    assert datalocal.request_replica(model, node.pk) is False
    created = Placement.objects.get(model=model, node=node)
    assert created.status == "pending"
    assert created.sha256 == model.sha256


def test_replica_needs_fitting_node(served):
    node, model = served
    Model.objects.filter(pk=model.pk).update(device="cuda")
    model.refresh_from_db()
    placement.staging_path(model.sha256).write_bytes(b"staged")
    with pytest.raises(ApiError) as caught:
        datalocal.request_replica(model, node.pk)
    assert caught.value.status_code == 409
    assert "device or memory constraints" in caught.value.message


def test_summary_cleaned():
    body = json.dumps({"rows": 3, "class_counts": {"10": 1, "2": 2}, "correct": 2, "accuracy": 2 / 3, "label_tensor": "labels", "extra": "x"})
    summary = datalocal.clean_summary(body.encode())
    assert list(summary["class_counts"]) == ["2", "10"]
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert "extra" not in summary


def test_summary_malformed_502():
    with pytest.raises(ApiError) as caught:
        datalocal.clean_summary(b'{"rows": -1, "class_counts": {}}')
    assert caught.value.status_code == 502


def test_predictions_decoded():
    body = safetensors.numpy.save({"predictions": np.array([3, 1, 4], dtype=np.int64)})
    assert datalocal.decode_predictions(body) == [3, 1, 4]


def test_predictions_not_integers_502():
    body = safetensors.numpy.save({"predictions": np.zeros(3, dtype=np.float32)})
    with pytest.raises(ApiError) as caught:
        datalocal.decode_predictions(body)
    assert caught.value.status_code == 502


# POST /api/models/{model_id}/infer-dataset/ errors.


async def post(token: str, body, content_type: str = "application/json"):
    data = body if isinstance(body, str) else json.dumps(body)
    return await AsyncClient().post(
        "/api/models/digits-cnn/infer-dataset/", data, content_type=content_type, headers={"Authorization": f"Bearer {token}"}
    )


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ("not json", "body", "the body is not valid JSON"),
        ({"dataset": "digits-1"}, "node", "node must be the integer id"),
        ({"node": 1, "dataset": "../x"}, "dataset", "dataset must be a dataset name"),
        ({"node": 1, "dataset": "digits-1", "aggregate": "yes"}, "aggregate", "aggregate must be true or false"),
        ({"node": 1, "dataset": "digits-1", "outputs": "probabilities"}, "outputs", "outputs must be one of argmax, raw"),
        ({"node": 1, "dataset": "digits-1", "aggregate": True, "outputs": "raw"}, "outputs", "not both"),
    ],
)
@committed
async def test_infer_dataset_malformed_400(served, owner, body, field, message):
    response = await post(owner[1], body)
    assert response.status_code == 400
    assert response.json()["error"]["field"] == field
    assert message in response.json()["error"]["message"]


@committed
async def test_infer_dataset_needs_json(served, owner):
    response = await post(owner[1], "node=1", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415


@committed
async def test_infer_dataset_unknown_dataset_404(served, owner):
    node, _ = served
    response = await post(owner[1], {"node": node.pk, "dataset": "absent"})
    assert response.status_code == 404
    assert "dataset 'absent' not found on node" in response.json()["error"]["message"]


@committed
async def test_infer_dataset_no_replica_409(served, owner):
    node, _ = served
    response = await post(owner[1], {"node": node.pk, "dataset": "digits-1", "aggregate": True})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "no_replica"


@committed
async def test_infer_dataset_no_token_401(served):
    response = await AsyncClient().post("/api/models/digits-cnn/infer-dataset/", "{}", content_type="application/json")
    assert response.status_code == 401


@committed
async def test_placement_row_untouched_on_409(served, owner):
    node, model = served
    await post(owner[1], {"node": node.pk, "dataset": "digits-1"})
    assert not await database_sync_to_async(Placement.objects.filter(model=model).exists)()
