"""End to end: a failed load on one node, constraints, model errors and non-finite outputs."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import load, save
from torch import nn

from tests.e2e import start_network, stop_network

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    net = start_network(tmp_path_factory.mktemp("place"), agents=3)
    # node-1 accepts no model over 1,000 bytes, so every load there fails.
    net.stack.kill("node-1")
    net.start_agent("node-1", GRID_MAX_MODEL_BYTES="1000")
    net.wait_online(3)
    yield net
    stop_network(net)


def auth(network) -> dict:
    return {"Authorization": f"Bearer {network.token}"}


def upload(network, model: nn.Module, model_id: str, signature: list[dict], **fields) -> httpx.Response:
    example = torch.rand(2, 4)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    data = {"model_id": model_id, "input_signature": json.dumps(signature), "allow_remote_inference": "true", **fields}
    return httpx.post(f"{network.stack.url}/api/models/", headers=auth(network), data=data, files={"file": ("m.pt2", buffer.getvalue())})


def wait_settled(network, model_id: str) -> dict:
    import time

    # "degraded" can be a passing state: after one node fails a load, the
    # model shows fewer replicas until the next placement task runs.
    deadline = time.monotonic() + 60
    while True:
        info = httpx.get(f"{network.stack.url}/api/models/{model_id}/", headers=auth(network)).json()
        if info["status"] not in ("placing", "degraded") or time.monotonic() > deadline:
            return info
        time.sleep(0.2)


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x):
        return self.layer(x)


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


def test_failed_load_moves_to_next_node(network):
    response = upload(network, Linear(), "fails-on-one", [{"name": "x", "dtype": "float32", "shape": [None, 4]}], replicas="2")
    assert response.status_code == 201
    info = wait_settled(network, "fails-on-one")
    by_node = {p["node_name"]: p for p in info["placements"]}
    assert info["status"] == "ready"
    assert by_node["node-1"]["status"] == "failed"
    assert "GRID_MAX_MODEL_BYTES" in by_node["node-1"]["error"]
    assert {name for name, p in by_node.items() if p["status"] == "ready"} == {"node-2", "node-3"}


def test_device_constraint_unmet(network):
    response = upload(network, Linear(), "needs-cuda", [{"name": "x", "dtype": "float32", "shape": [None, 4]}], device="cuda")
    info = wait_settled(network, "needs-cuda")
    assert response.status_code == 201
    assert info["status"] == "failed"
    assert info["placements"] == []
    assert "constraints" in info["status_reason"]


def test_model_error_is_422(network):
    # The signature lets any width through; the program itself needs width 4.
    upload(network, Linear(), "strict-width", [{"name": "x", "dtype": "float32", "shape": [None, None]}], replicas="2")
    assert wait_settled(network, "strict-width")["status"] == "ready"
    response = httpx.post(
        f"{network.stack.url}/api/models/strict-width/infer/",
        content=save({"x": np.zeros((2, 5), np.float32)}),
        headers={**auth(network), "Content-Type": "application/vnd.safetensors"},
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "model_error"


def test_non_finite_outputs_returned(network):
    upload(network, Log(), "logs", [{"name": "x", "dtype": "float32", "shape": [None, 4]}], replicas="2")
    assert wait_settled(network, "logs")["status"] == "ready"
    inputs = np.array([[-1.0, 0.0, 1.0, 2.0]], np.float32)
    response = httpx.post(
        f"{network.stack.url}/api/models/logs/infer/",
        content=save({"x": inputs}),
        headers={**auth(network), "Content-Type": "application/vnd.safetensors"},
    )
    output = load(response.content)["output"]
    assert response.status_code == 200
    assert np.isnan(output[0, 0])
    assert np.isneginf(output[0, 1])
    assert output[0, 2] == 0.0
