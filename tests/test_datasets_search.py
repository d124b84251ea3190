"""Search by tag, the tag list, model search and model lookups, on real PostgreSQL."""

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from apps.accounts.models import ApiToken
from apps.inference.models import Model, Placement
from apps.registry.models import Dataset, Node

# Every test here is synchronous, so each runs in a transaction that is rolled back.
pytestmark = pytest.mark.django_db

TENSORS = {"images": {"dtype": "float32", "shape": [4, 1, 8, 8]}}


@pytest.fixture
def client():
    user = get_user_model().objects.create_user("alice")
    plain = ApiToken.issue(user=user, name="test")[1]
    return Client(HTTP_AUTHORIZATION=f"Bearer {plain}")


def node(name: str, status: str = "online") -> Node:
    created, _ = Node.enroll(name)
    Node.objects.filter(pk=created.pk).update(status=status)
    created.status = status
    return created


def dataset(owner: Node, name: str, *tags: str) -> Dataset:
    return Dataset.objects.create(node=owner, name=name, tags=list(tags), tensors=TENSORS, rows=4)


@pytest.fixture
def network():
    north, south, gone = node("north"), node("south"), node("gone", "offline")
    dataset(north, "digits-a", "digits", "test", "shard-1")
    dataset(south, "digits-b", "digits", "train")
    dataset(gone, "digits-c", "digits", "test")
    dataset(south, "faces", "faces", "test")
    return north, south, gone


def names(response) -> list[str]:
    return sorted(item["name"] for item in response.json()["results"])


def error(response) -> dict:
    return response.json()["error"]


# GET /api/search/


def test_search_needs_every_tag(client, network):
    response = client.get("/api/search/?tags=digits,test")
    assert response.status_code == 200
    assert names(response) == ["digits-a"]


def test_search_one_tag(client, network):
    assert names(client.get("/api/search/?tags=digits")) == ["digits-a", "digits-b"]


def test_search_ignores_case(client, network):
    assert names(client.get("/api/search/?tags=DIGITS,Test")) == ["digits-a"]


def test_search_unknown_tag_is_empty(client, network):
    response = client.get("/api/search/?tags=digits,nothing-has-this")
    assert response.status_code == 200
    assert response.json() == {"count": 0, "results": []}


def test_search_result_names_node(client, network):
    north, _, _ = network
    result = client.get("/api/search/?tags=shard-1").json()["results"][0]
    assert result["node"] == north.pk
    assert result["node_name"] == "north"
    assert result["node_status"] == "online"
    assert result["rows"] == 4
    assert result["tensors"] == TENSORS


def test_search_leaves_out_offline_nodes(client, network):
    assert "digits-c" not in names(client.get("/api/search/?tags=digits,test"))


def test_search_leaves_out_draining_nodes(client, network):
    Node.objects.filter(name="north").update(status="draining")
    assert names(client.get("/api/search/?tags=digits")) == ["digits-b"]


def test_search_include_offline_marks_status(client, network):
    results = client.get("/api/search/?tags=digits,test&include_offline=1").json()["results"]
    status = {item["name"]: item["node_status"] for item in results}
    assert status == {"digits-a": "online", "digits-c": "offline"}


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ("", "tags", "tags is required"),
        ("?tags=", "tags", "tags is required"),
        ("?tags=digits,,test", "tags", "tag '' is invalid"),
        ("?tags=bad%20tag", "tags", "tag 'bad tag' is invalid"),
        ("?tags=" + ",".join(f"t{i}" for i in range(33)), "tags", "at most 32"),
        ("?tags=digits&include_offline=maybe", "include_offline", "include_offline='maybe' is not a boolean"),
    ],
)
def test_search_malformed_is_400(client, network, query, field, message):
    response = client.get("/api/search/" + query)
    assert response.status_code == 400
    assert error(response)["code"] == "invalid_input"
    assert error(response)["field"] == field
    assert message in error(response)["message"]


def test_search_needs_token(network):
    assert Client().get("/api/search/?tags=digits").status_code == 401


# GET /api/tags/


def test_tags_count_online_nodes(client, network):
    body = client.get("/api/tags/").json()
    assert body["tags"] == ["digits", "faces", "shard-1", "test", "train"]
    assert body["counts"]["digits"] == 2
    assert body["counts"]["test"] == 2


def test_tags_include_offline(client, network):
    body = client.get("/api/tags/?include_offline=1").json()
    assert body["counts"]["digits"] == 3
    assert body["counts"]["test"] == 3


def test_tags_malformed_flag_is_400(client, network):
    response = client.get("/api/tags/?include_offline=2")
    assert response.status_code == 400
    assert error(response)["field"] == "include_offline"


# GET /api/models/?search= and GET /api/models/{model_id}/nodes/


@pytest.fixture
def models(network):
    north, south, gone = network
    owner = get_user_model().objects.create_user("owner")
    signature = [{"name": "images", "dtype": "float32", "shape": [None, 1, 8, 8]}]
    digits = Model.objects.create(model_id="digits-cnn", owner=owner, sha256="a" * 64, size=10, input_signature=signature)
    Model.objects.create(model_id="faces-net", owner=owner, sha256="b" * 64, size=10, input_signature=signature)
    Placement.objects.create(model=digits, node=north, sha256=digits.sha256, status="ready")
    Placement.objects.create(model=digits, node=south, sha256=digits.sha256, status="transferring")
    Placement.objects.create(model=digits, node=gone, sha256=digits.sha256, status="ready")
    # A replica of an older version is not where the model resolves.
    Placement.objects.create(model=digits, node=south, sha256="c" * 64, status="ready")
    return digits


def test_model_search_matches_substring(client, models):
    response = client.get("/api/models/?search=DIGITS")
    assert [item["model_id"] for item in response.json()["results"]] == ["digits-cnn"]


def test_model_search_unknown_is_empty(client, models):
    assert client.get("/api/models/?search=nothing").json()["results"] == []


def test_model_nodes_lists_ready_online(client, models):
    body = client.get("/api/models/digits-cnn/nodes/").json()
    assert body["model_id"] == "digits-cnn"
    assert [item["node_name"] for item in body["results"]] == ["north"]
    assert body["results"][0]["node_status"] == "online"


def test_model_nodes_include_offline(client, models):
    body = client.get("/api/models/digits-cnn/nodes/?include_offline=1").json()
    assert {item["node_name"]: item["node_status"] for item in body["results"]} == {"gone": "offline", "north": "online"}


def test_model_nodes_unknown_model_is_404(client, models):
    response = client.get("/api/models/nothing/nodes/")
    assert response.status_code == 404
    assert "model 'nothing' not found" in error(response)["message"]
