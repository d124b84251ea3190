"""GridNetwork settings, listings and the async client."""

import json
import logging

import httpx
import numpy as np
import pytest
import safetensors.numpy

import gridclient as gr

URL = "http://gateway.test"
TOKEN = "s3cr3t-5a4b3c"


def node(node_id, name, status, models=()):
    return {
        "id": node_id,
        "name": name,
        "status": status,
        "last_heartbeat": "2025-01-01T00:00:00Z",
        "connected_since": "2025-01-01T00:00:00Z",
        "protocol_version": 1,
        "capabilities": {},
        "in_flight": 0,
        "models": list(models),
    }


MODEL = {
    "model_id": "m1",
    "status": "degraded",
    "replicas": 3,
    "ready_replicas": 1,
    "input_signature": [{"name": "x", "dtype": "float32", "shape": [None, 2]}],
    "placements": [
        {
            "node": 1,
            "node_name": "node-a",
            "status": "ready",
            "error": "",
            "updated": None,
        },
        {
            "node": 2,
            "node_name": "node-b",
            "status": "failed",
            "error": "oom",
            "updated": None,
        },
        {
            "node": 3,
            "node_name": "node-c",
            "status": "transferring",
            "error": "",
            "updated": None,
        },
    ],
}

DATASET = {
    "name": "scans",
    "tags": ["mri", "brain"],
    "description": "brain scans",
    "rows": 120,
    "node": 1,
    "node_name": "node-a",
    "node_status": "online",
}


NODES = [
    node(1, "node-a", "online", ["m1"]),
    node(2, "node-b", "offline"),
    node(3, "node-c", "draining"),
]

# JSON bodies of the GET and POST routes, by method and path.
JSON_ROUTES = {
    ("GET", "/api/nodes/"): {"count": 3, "results": NODES},
    ("GET", "/api/models/"): {"count": 1, "results": [MODEL]},
    ("GET", "/api/models/m1/"): MODEL,
    # The gateway lists only ready replicas on online nodes here.
    ("GET", "/api/models/m1/nodes/"): {"model_id": "m1", "count": 1, "results": [{**MODEL["placements"][0], "node_status": "online"}]},
    ("POST", "/api/nodes/disconnect/"): {"disconnected": 2},
    ("GET", "/api/search/"): {"count": 1, "results": [DATASET]},
    ("GET", "/api/tags/"): {"tags": ["brain", "mri"]},
}


class FakeGateway:
    """Serves JSON_ROUTES, deletes m1, and runs m1 as a model that adds 1."""

    def __init__(self):
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        route = (request.method, request.url.path)
        if route in JSON_ROUTES:
            return httpx.Response(200, json=JSON_ROUTES[route])

        if route == ("DELETE", "/api/models/m1/"):
            return httpx.Response(204)

        if route == ("POST", "/api/models/m1/infer/"):
            arrays = safetensors.numpy.load(request.read())
            body = safetensors.numpy.save({"output": arrays["x"] + 1})
            return httpx.Response(200, content=body)

        message = f"no route {route}"
        error = {"error": {"code": "not_found", "message": message, "field": None}}
        return httpx.Response(404, content=json.dumps(error).encode())


def client_for(handler, **options) -> gr.GridNetwork:
    return gr.GridNetwork(
        URL, token=TOKEN, transport=httpx.MockTransport(handler), **options
    )


def test_repr_hides_token():
    with client_for(FakeGateway()) as client:
        text = repr(client)

    assert TOKEN not in text
    assert text == "GridNetwork(url='http://gateway.test', token=set)"


def test_async_repr_hides_token():
    client = gr.AsyncGridNetwork(URL, token=TOKEN)

    assert TOKEN not in repr(client)
    assert repr(client) == "AsyncGridNetwork(url='http://gateway.test', token=set)"


def test_token_not_in_vars_str():
    with client_for(FakeGateway()) as client:
        assert TOKEN not in str(client)
        assert TOKEN not in repr(vars(client))


def test_from_env_reads_url_and_token(monkeypatch):
    monkeypatch.setenv("GRID_URL", "https://grid.example.org/")
    monkeypatch.setenv("GRID_TOKEN", TOKEN)
    gateway = FakeGateway()
    with gr.GridNetwork.from_env(transport=httpx.MockTransport(gateway)) as client:
        client.available_tags()

    assert client.url == "https://grid.example.org"
    assert str(gateway.requests[0].url) == "https://grid.example.org/api/tags/"
    assert gateway.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"


def test_missing_url_raises(monkeypatch):
    monkeypatch.delenv("GRID_URL", raising=False)

    with pytest.raises(ValueError, match="set the GRID_URL environment variable"):
        gr.GridNetwork()


def test_invalid_url_raises():
    with pytest.raises(ValueError, match="invalid Grid gateway URL 'grid.example.org'"):
        gr.GridNetwork("grid.example.org")


def test_no_token_sends_no_auth(monkeypatch):
    monkeypatch.delenv("GRID_TOKEN", raising=False)
    gateway = FakeGateway()
    with gr.GridNetwork(URL, transport=httpx.MockTransport(gateway)) as client:
        client.available_tags()

    assert "Authorization" not in gateway.requests[0].headers
    assert repr(client) == "GridNetwork(url='http://gateway.test', token=none)"


def test_plain_http_remote_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="gridclient"):
        gr.GridNetwork("http://grid.example.org", token=TOKEN).close()
        gr.GridNetwork("http://127.0.0.1:8000", token=TOKEN).close()

    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "Sending the Grid token unencrypted to http://grid.example.org; "
        "use https:// for remote gateways"
    ]


def test_connected_nodes_with_status():
    with client_for(FakeGateway()) as client:
        nodes = client.connected_nodes()

    assert [n["name"] for n in nodes] == ["node-a", "node-b", "node-c"]
    assert [n["status"] for n in nodes] == ["online", "offline", "draining"]
    assert nodes[0]["models"] == ["m1"]


def test_available_models():
    with client_for(FakeGateway()) as client:
        models = client.available_models()

    assert [m.model_id for m in models] == ["m1"]
    assert models[0].placements[1].error == "oom"


def test_search_model_ready_only():
    with client_for(FakeGateway()) as client:
        placements = client.search_model("m1")

    assert [p.node_name for p in placements] == ["node-a"]
    assert placements[0].node == 1


def test_search_sends_tags():
    gateway = FakeGateway()
    with client_for(gateway) as client:
        results = client.search("mri", "brain")

    assert gateway.requests[0].url.params["tags"] == "mri,brain"
    assert "include_offline" not in gateway.requests[0].url.params
    assert results == [DATASET]


def test_search_include_offline():
    gateway = FakeGateway()
    with client_for(gateway) as client:
        client.search("mri", include_offline=True)

    assert gateway.requests[0].url.params["include_offline"] == "true"


def test_search_needs_a_tag():
    gateway = FakeGateway()
    with client_for(gateway) as client:
        with pytest.raises(ValueError, match="at least one tag"):
            client.search()

    assert gateway.requests == []


def test_search_rejects_comma_tag():
    with client_for(FakeGateway()) as client:
        with pytest.raises(ValueError, match="invalid tag 'a,b'"):
            client.search("a,b")


def test_available_tags():
    with client_for(FakeGateway()) as client:
        assert client.available_tags() == ["brain", "mri"]


def test_delete_model():
    gateway = FakeGateway()
    with client_for(gateway) as client:
        assert client.delete_model("m1") is None

    assert gateway.requests[0].method == "DELETE"
    assert gateway.requests[0].url.path == "/api/models/m1/"


def test_model_id_quoted_in_path():
    gateway = FakeGateway()
    with client_for(gateway) as client:
        with pytest.raises(gr.NotFound):
            client.get_model("a/b c")

    assert gateway.requests[0].url.raw_path == b"/api/models/a%2Fb%20c/"


def test_disconnect_nodes_count():
    gateway = FakeGateway()
    with client_for(gateway) as client:
        assert client.disconnect_nodes() == 2

    assert gateway.requests[0].method == "POST"


def test_next_page_followed():
    pages = {
        "/api/nodes/": {
            "count": 2,
            "next": f"{URL}/api/nodes/?page=2",
            "results": [node(1, "a", "online")],
        },
        "/api/nodes/?page=2": {
            "count": 2,
            "next": None,
            "results": [node(2, "b", "online")],
        },
    }

    def handler(request):
        key = request.url.raw_path.decode()
        return httpx.Response(200, json=pages[key])

    with client_for(handler) as client:
        nodes = client.connected_nodes()

    assert [n["name"] for n in nodes] == ["a", "b"]


def test_foreign_next_page_ignored():
    requests = []

    def handler(request):
        requests.append(request)
        page = {
            "count": 2,
            "next": "http://elsewhere.test/api/nodes/?page=2",
            "results": [node(1, "a", "online")],
        }
        return httpx.Response(200, json=page)

    with client_for(handler) as client:
        nodes = client.connected_nodes()

    assert [n["name"] for n in nodes] == ["a"]
    assert len(requests) == 1


async def test_async_listing_and_inference():
    gateway = FakeGateway()
    async with gr.AsyncGridNetwork(
        URL, token=TOKEN, transport=httpx.MockTransport(gateway)
    ) as client:
        nodes = await client.connected_nodes()
        placements = await client.search_model("m1")
        result = await client.run_remote_inference(
            "m1", np.zeros((3, 2), np.float32), batch_size=2
        )
        count = await client.disconnect_nodes()

    assert [n["name"] for n in nodes] == ["node-a", "node-b", "node-c"]
    assert [p.node_name for p in placements] == ["node-a"]
    assert result.tolist() == [[1, 1], [1, 1], [1, 1]]
    assert count == 2


async def test_async_retry_uses_injected_sleep():
    delays = []
    responses = [
        httpx.Response(429, headers={"Retry-After": "4"}),
        httpx.Response(200, json={"tags": ["a"]}),
    ]

    async def fake_sleep(seconds):
        delays.append(seconds)

    def handler(request):
        return responses.pop(0)

    async with gr.AsyncGridNetwork(
        URL, token=TOKEN, transport=httpx.MockTransport(handler), sleep=fake_sleep
    ) as client:
        tags = await client.available_tags()

    assert tags == ["a"]
    assert delays == [4.0]


async def test_async_unreachable_names_url():
    def handler(request):
        raise httpx.ConnectError("refused", request=request)

    async def no_sleep(seconds):
        return None

    async with gr.AsyncGridNetwork(
        URL, token=TOKEN, transport=httpx.MockTransport(handler), sleep=no_sleep
    ) as client:
        with pytest.raises(gr.GridConnectionError, match="http://gateway.test"):
            await client.get_model("m1")


async def test_async_serve_waits_for_ready():
    torch = pytest.importorskip("torch")
    states = [dict(MODEL, status="placing"), dict(MODEL, status="ready")]
    uploads = []

    def handler(request):
        if request.method == "POST":
            uploads.append(request.read())
            return httpx.Response(201, json=dict(MODEL, status="placing"))
        return httpx.Response(200, json=states.pop(0))

    async def no_sleep(seconds):
        return None

    model = torch.nn.Linear(2, 1)
    async with gr.AsyncGridNetwork(
        URL, token=TOKEN, transport=httpx.MockTransport(handler), sleep=no_sleep
    ) as client:
        info = await client.serve_model(model, "m1", example_inputs=torch.ones(2, 2))

    assert info.status == "ready"
    assert len(uploads) == 1
    assert b'name="model_id"' in uploads[0]
    assert states == []
