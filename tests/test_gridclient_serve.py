"""serve_model: export, multipart upload and waiting for placement."""

import email.parser
import email.policy
import io
import json

import httpx
import pytest
import torch

import gridclient as gr
from gridclient.progress import ProgressStream

URL = "http://gateway.test"


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.relu(self.linear(x))


class TwoInputs(torch.nn.Module):
    def forward(self, image, mask):
        return image.flatten(1) * mask


def parse_multipart(
    request: httpx.Request,
) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """Return the form fields and the files (filename, bytes) of a multipart request."""
    head = f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        head + request.read()
    )
    fields, files = {}, {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        payload = part.get_payload(decode=True)
        if filename is None:
            fields[name] = payload.decode()
        else:
            files[name] = (filename, payload)
    return fields, files


def model_json(status="placing", replicas=1, placements=(), **extra):
    ready = sum(1 for p in placements if p["status"] == "ready")
    return {
        "model_id": "m1",
        "owner": "alice",
        "format": "torch.export",
        "sha256": "ab" * 32,
        "size": 100,
        "input_signature": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
        "allow_remote_inference": True,
        "allow_download": False,
        "replicas": replicas,
        "created": "2025-01-01T00:00:00Z",
        "status": status,
        "status_reason": "",
        "ready_replicas": ready,
        "placements": list(placements),
        **extra,
    }


def placement(node, name, status, error=""):
    return {
        "node": node,
        "node_name": name,
        "status": status,
        "error": error,
        "updated": None,
    }


class FakeGateway:
    """Accepts one upload, then returns the queued model states to each GET."""

    def __init__(self, *states):
        self.states = list(states)
        self.uploads: list[httpx.Request] = []
        self.gets = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/api/models/":
            request.read()
            self.uploads.append(request)
            return httpx.Response(201, json=model_json())
        if request.method == "GET" and request.url.path == "/api/models/m1/":
            self.gets += 1
            state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            return httpx.Response(200, json=state)
        return httpx.Response(
            404,
            json={"error": {"code": "not_found", "message": "no route", "field": None}},
        )


class FakeTime:
    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self):
        return self.now


def client_for(handler, fake_time=None) -> gr.GridNetwork:
    fake_time = fake_time or FakeTime()
    return gr.GridNetwork(
        URL,
        token="tok",
        transport=httpx.MockTransport(handler),
        sleep=fake_time.sleep,
        clock=fake_time.clock,
    )


def ready_state(replicas=1):
    nodes = [placement(i + 1, f"node-{i + 1}", "ready") for i in range(replicas)]
    return model_json("ready", replicas=replicas, placements=nodes)


def test_upload_fields_and_filename():
    gateway = FakeGateway(ready_state(2))
    with client_for(gateway) as client:
        client.serve_model(
            Net(),
            "m1",
            allow_remote_inference=True,
            replicas=2,
            example_inputs=torch.randn(3, 4),
        )

    fields, files = parse_multipart(gateway.uploads[0])
    assert fields["model_id"] == "m1"
    assert fields["allow_remote_inference"] == "true"
    assert fields["allow_download"] == "false"
    assert fields["replicas"] == "2"
    assert files["file"][0] == "m1.pt2"
    assert gateway.uploads[0].headers["Authorization"] == "Bearer tok"


def test_signature_has_null_batch():
    gateway = FakeGateway(ready_state())
    with client_for(gateway) as client:
        client.serve_model(Net(), "m1", example_inputs=torch.randn(3, 4))

    fields, _ = parse_multipart(gateway.uploads[0])
    assert json.loads(fields["input_signature"]) == [
        {"name": "x", "dtype": "float32", "shape": [None, 4]}
    ]


def test_uploaded_archive_loads_and_batches():
    model = Net().eval()
    gateway = FakeGateway(ready_state())
    with client_for(gateway) as client:
        client.serve_model(model, "m1", example_inputs=torch.randn(1, 4))

    _, files = parse_multipart(gateway.uploads[0])
    program = torch.export.load(io.BytesIO(files["file"][1]))
    batch = torch.randn(5, 4)
    assert program.module()(batch).shape == (5, 3)
    assert torch.allclose(program.module()(batch), model(batch))


def test_uploaded_archive_passes_gateway_check():
    pt2 = pytest.importorskip("gridproto.pt2")
    gateway = FakeGateway(ready_state())
    with client_for(gateway) as client:
        client.serve_model(Net(), "m1", example_inputs=torch.randn(2, 4))

    _, files = parse_multipart(gateway.uploads[0])
    info = pt2.check_archive(io.BytesIO(files["file"][1]), max_unpacked_bytes=10**8)
    assert info.input_names == ["x"]


def test_two_inputs_signature():
    gateway = FakeGateway(ready_state())
    with client_for(gateway) as client:
        client.serve_model(
            TwoInputs(),
            "m1",
            example_inputs=(torch.randn(2, 1, 2, 2), torch.randn(2, 4)),
        )

    fields, _ = parse_multipart(gateway.uploads[0])
    assert json.loads(fields["input_signature"]) == [
        {"name": "image", "dtype": "float32", "shape": [None, 1, 2, 2]},
        {"name": "mask", "dtype": "float32", "shape": [None, 4]},
    ]


def test_build_supplies_example_inputs():
    model = Net()
    data = torch.randn(2, 4)
    gateway = FakeGateway(ready_state())
    with client_for(gateway) as client:
        assert gr.build(model, data) is model
        info = client.serve_model(model, "m1")

    assert info.status == "ready"
    assert len(gateway.uploads) == 1


def test_missing_example_inputs_raises():
    gateway = FakeGateway(ready_state())
    with client_for(gateway) as client:
        with pytest.raises(
            ValueError, match=r"pass example_inputs= or call gr.build\(model, data\)"
        ):
            client.serve_model(Net(), "m1")

    assert gateway.uploads == []


def test_saved_archive_needs_signature(tmp_path):
    path = tmp_path / "net.pt2"
    program = torch.export.export(Net(), (torch.randn(2, 4),))
    torch.export.save(program, path)
    gateway = FakeGateway(ready_state())
    with client_for(gateway) as client:
        with pytest.raises(ValueError, match="input_signature= is required"):
            client.serve_model(path, "m1")
        signature = [{"name": "x", "dtype": "float32", "shape": [2, 4]}]
        client.serve_model(str(path), "m1", input_signature=signature)

    fields, files = parse_multipart(gateway.uploads[0])
    assert files["file"][1] == path.read_bytes()
    assert json.loads(fields["input_signature"]) == signature


def test_invalid_signature_dtype_raises():
    gateway = FakeGateway(ready_state())
    with client_for(gateway) as client:
        with pytest.raises(ValueError, match="dtype 'float'"):
            client.serve_model(
                b"PK",
                "m1",
                input_signature=[{"name": "x", "dtype": "float", "shape": [None]}],
            )

    assert gateway.uploads == []


def test_waits_until_ready():
    states = [
        model_json("placing", placements=[placement(1, "node-a", "transferring")]),
        model_json("placing", placements=[placement(1, "node-a", "transferring")]),
        ready_state(),
    ]
    gateway = FakeGateway(*states)
    fake_time = FakeTime()
    with client_for(gateway, fake_time) as client:
        info = client.serve_model(Net(), "m1", example_inputs=torch.randn(2, 4))

    assert info.status == "ready"
    assert info.ready_replicas == 1
    assert info.placements[0].node_name == "node-1"
    assert gateway.gets == 3
    assert fake_time.sleeps == [0.5, 0.75, 1.125]


def test_wait_false_returns_after_upload():
    gateway = FakeGateway(ready_state())
    with client_for(gateway) as client:
        info = client.serve_model(
            Net(), "m1", example_inputs=torch.randn(2, 4), wait=False
        )

    assert info.status == "placing"
    assert gateway.gets == 0


def test_placement_failure_raises():
    failed = model_json(
        "failed",
        replicas=2,
        placements=[
            placement(
                3, "node-c", "failed", "model does not load: unsupported operator"
            ),
            placement(4, "node-d", "failed", "disk full"),
        ],
        status_reason="no replica could be placed",
    )
    gateway = FakeGateway(failed)
    with client_for(gateway) as client:
        with pytest.raises(gr.PlacementError) as caught:
            client.serve_model(Net(), "m1", example_inputs=torch.randn(2, 4))

    message = str(caught.value)
    assert "no replica could be placed" in message
    assert (
        "node-c (node 3) failed: model does not load: unsupported operator" in message
    )
    assert "node-d (node 4) failed: disk full" in message
    assert [p.node for p in caught.value.placements] == [3, 4]
    assert caught.value.model.status == "failed"
    assert not isinstance(caught.value, gr.PlacementTimeout)


def test_placement_timeout_lists_pending():
    placing = model_json(
        "placing",
        replicas=2,
        placements=[
            placement(1, "node-a", "ready"),
            placement(2, "node-b", "transferring"),
        ],
    )
    gateway = FakeGateway(placing)
    fake_time = FakeTime()
    with client_for(gateway, fake_time) as client:
        with pytest.raises(gr.PlacementTimeout) as caught:
            client.serve_model(
                Net(), "m1", example_inputs=torch.randn(2, 4), timeout=10
            )

    message = str(caught.value)
    assert "still placing after 10s" in message
    assert "1 of 2 replicas ready" in message
    assert "node-b (node 2) transferring" in message
    assert "node-a" not in message
    assert [p.node_name for p in caught.value.placements] == ["node-b"]
    assert isinstance(caught.value, TimeoutError)
    assert sum(fake_time.sleeps) == pytest.approx(10.0)


def test_degraded_returns_with_warning(caplog):
    degraded = model_json(
        "degraded",
        replicas=2,
        placements=[
            placement(1, "node-a", "ready"),
            placement(2, "node-b", "failed", "oom"),
        ],
        status_reason="1 of 2 replicas failed",
    )
    gateway = FakeGateway(degraded)
    with caplog.at_level("WARNING", logger="gridclient"):
        with client_for(gateway) as client:
            info = client.serve_model(Net(), "m1", example_inputs=torch.randn(2, 4))

    assert info.status == "degraded"
    warnings = [r.getMessage() for r in caplog.records if "degraded" in r.getMessage()]
    assert warnings == [
        "Model m1 is degraded: 1 of 2 replicas ready. 1 of 2 replicas failed"
    ]


def test_upload_retry_resends_body():
    gateway = FakeGateway(ready_state())
    seen: list[bytes] = []

    def handler(request):
        if request.method == "POST" and len(seen) == 0:
            seen.append(request.read())
            return httpx.Response(503, headers={"Retry-After": "0"})
        if request.method == "POST":
            seen.append(request.read())
        return gateway(request)

    with client_for(handler) as client:
        client.serve_model(Net(), "m1", example_inputs=torch.randn(2, 4))

    assert len(seen) == 2
    assert seen[0] == seen[1]
    assert int(gateway.uploads[0].headers["Content-Length"]) == len(seen[1])


def test_signature_cached_from_upload():
    gateway = FakeGateway(ready_state())
    with client_for(gateway) as client:
        client.serve_model(Net(), "m1", example_inputs=torch.randn(2, 4), wait=False)

        assert client._signatures._names["m1"] == ["x"]


def test_model_info_keeps_unknown_fields():
    info = gr.ModelInfo.from_json(model_json("ready", tier="gold"))

    assert info.extra == {"tier": "gold"}
    assert info.to_dict()["tier"] == "gold"
    assert info.to_dict()["model_id"] == "m1"
    assert info.input_names == ["x"]


def test_no_bar_without_terminal(capsys):
    gateway = FakeGateway(ready_state())
    with client_for(gateway) as client:
        client.serve_model(Net(), "m1", example_inputs=torch.randn(2, 4), progress=True)

    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out == ""


def test_progress_stream_restarts():
    reports = []
    stream = ProgressStream(b"x" * 10, reports.append, chunk_bytes=4)

    first = b"".join(stream)
    second = b"".join(stream)

    assert first == b"x" * 10
    assert second == first
    assert reports == [0, 4, 8, 10, 0, 4, 8, 10]


async def test_progress_stream_async():
    reports = []
    stream = ProgressStream(b"abcdefg", reports.append, chunk_bytes=3)

    chunks = [chunk async for chunk in stream]

    assert chunks == [b"abc", b"def", b"g"]
    assert reports == [0, 3, 6, 7]
