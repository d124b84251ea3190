"""End to end: async jobs, idempotency, load balancing, verify=2, deadlines and backpressure."""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import load, save

from demo.digits import DigitsCNN
from tests.e2e import start_network, stop_network

pytestmark = pytest.mark.e2e

MODEL = "jobs-cnn"


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    net = start_network(
        tmp_path_factory.mktemp("jobs"),
        agents=2,
        agent_env={"GRID_CONCURRENCY": "1"},
        GRID_NODE_QUEUE_FACTOR="1",
        GRID_QUEUE_WAIT="0.5",
    )
    torch.manual_seed(3)
    model = DigitsCNN().eval()
    with net.client() as gateway:
        gateway.serve_model(model, MODEL, allow_remote_inference=True, replicas=2, example_inputs=torch.rand(2, 1, 8, 8), progress=False)
    net.model = model
    yield net
    stop_network(net)


def headers(network, **extra) -> dict:
    return {"Authorization": f"Bearer {network.token}", "Content-Type": "application/vnd.safetensors", **extra}


def body(images: torch.Tensor) -> bytes:
    return save({"images": images.numpy()})


def restart_agents(network, **env: str) -> None:
    for name in network.node_tokens:
        network.stack.kill(name, signal.SIGKILL)
    for name in network.node_tokens:
        network.start_agent(name, GRID_CONCURRENCY="1", **env)
    network.wait_online(2)
    # Placements come back ready when each agent reports its held model.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = httpx.get(f"{network.stack.url}/api/models/{MODEL}/", headers=headers(network)).json()
        if info["ready_replicas"] == 2:
            return
        time.sleep(0.2)
    raise AssertionError("replicas did not come back after the restart")


def test_async_job_returns_result(network):
    images = torch.rand(5, 1, 8, 8)
    url = network.stack.url
    accepted = httpx.post(f"{url}/api/jobs/?model={MODEL}", content=body(images), headers=headers(network))
    assert accepted.status_code == 202
    job_url = accepted.json()["url"]
    assert accepted.headers["Location"] == job_url
    deadline = time.monotonic() + 20
    while (job := httpx.get(url + job_url, headers=headers(network)).json())["status"] not in {"succeeded", "failed"}:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    result = httpx.get(url + job["result_url"], headers=headers(network))
    outputs = load(result.content)["output"]
    assert job["status"] == "succeeded"
    assert np.allclose(outputs, network.model(images).detach().numpy(), atol=1e-5)


def test_job_hidden_from_other_user(network):
    other = network.stack.manage("createtoken", "stranger", "--create-user")
    accepted = httpx.post(f"{network.stack.url}/api/jobs/?model={MODEL}", content=body(torch.rand(1, 1, 8, 8)), headers=headers(network))
    response = httpx.get(network.stack.url + accepted.json()["url"], headers={"Authorization": f"Bearer {other}"})
    assert response.status_code == 404


def test_idempotency_key_returns_same_job(network):
    key = str(uuid.uuid4())
    content = body(torch.rand(2, 1, 8, 8))
    first = httpx.post(f"{network.stack.url}/api/jobs/?model={MODEL}", content=content, headers=headers(network, **{"Idempotency-Key": key}))
    second = httpx.post(f"{network.stack.url}/api/jobs/?model={MODEL}", content=content, headers=headers(network, **{"Idempotency-Key": key}))
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.json()["job_id"] == first.json()["job_id"]


def test_sync_retry_with_key_same_job(network):
    key = str(uuid.uuid4())
    content = body(torch.rand(2, 1, 8, 8))
    url = f"{network.stack.url}/api/models/{MODEL}/infer/"
    first = httpx.post(url, content=content, headers=headers(network, **{"Idempotency-Key": key}))
    second = httpx.post(url, content=content, headers=headers(network, **{"Idempotency-Key": key}))
    assert first.status_code == 200
    assert second.status_code == 200
    assert second.headers["X-Grid-Job-Id"] == first.headers["X-Grid-Job-Id"]
    assert second.content == first.content


def test_load_spread_over_replicas(network):
    url = f"{network.stack.url}/api/models/{MODEL}/infer/"
    content = body(torch.rand(1, 1, 8, 8))

    def one(_):
        return httpx.post(url, content=content, headers=headers(network)).headers["X-Grid-Node"]

    with ThreadPoolExecutor(max_workers=2) as pool:
        served = Counter(pool.map(one, range(40)))
    assert set(served) == {"node-1", "node-2"}
    assert min(served.values()) >= 5


def test_verify_passes_on_honest_nodes(network):
    response = httpx.post(f"{network.stack.url}/api/models/{MODEL}/infer/?verify=2", content=body(torch.rand(3, 1, 8, 8)), headers=headers(network))
    assert response.status_code == 200
    assert sorted(response.headers["X-Grid-Verified-By"].split(",")) == ["node-1", "node-2"]


def test_verify_catches_lying_node(network):
    network.stack.kill("node-2", signal.SIGKILL)
    network.start_agent("node-2", GRID_CONCURRENCY="1", GRID_AGENT_FAULT="wrong-outputs")
    restart_deadline = time.monotonic() + 20
    while httpx.get(f"{network.stack.url}/api/models/{MODEL}/", headers=headers(network)).json()["ready_replicas"] < 2:
        assert time.monotonic() < restart_deadline
        time.sleep(0.2)
    response = httpx.post(f"{network.stack.url}/api/models/{MODEL}/infer/?verify=2", content=body(torch.rand(3, 1, 8, 8)), headers=headers(network))
    nodes = {n["name"]: n for n in httpx.get(f"{network.stack.url}/api/nodes/", headers=headers(network)).json()["results"]}
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "verification_mismatch"
    assert "node-1" in response.json()["error"]["message"]
    assert nodes["node-2"]["verification_mismatches"][0]["model_id"] == MODEL
    assert nodes["node-1"]["verification_mismatches"][0]["model_id"] == MODEL


def test_deadline_gives_504(network):
    restart_agents(network, GRID_AGENT_DELAY_MS="3000")
    started = time.monotonic()
    response = httpx.post(
        f"{network.stack.url}/api/models/{MODEL}/infer/?timeout=1", content=body(torch.rand(1, 1, 8, 8)), headers=headers(network), timeout=30
    )
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    assert time.monotonic() - started < 10


def test_full_replicas_give_429(network):
    # Agents are still slow (3 s a request) and take one request each.
    url = f"{network.stack.url}/api/models/{MODEL}/infer/?timeout=20"
    content = body(torch.rand(1, 1, 8, 8))

    def one(_):
        return httpx.post(url, content=content, headers=headers(network), timeout=60)

    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(one, range(6)))
    codes = Counter(r.status_code for r in responses)
    rejected = [r for r in responses if r.status_code == 429]
    assert codes[200] >= 2
    assert codes[429] >= 1
    assert rejected[0].headers["Retry-After"] == "1"
    assert set(codes) <= {200, 429}
