"""End to end: replicas heal after a node loss, downloads relay from a replica, delete evicts."""

from __future__ import annotations

import hashlib
import io
import signal
import time
from pathlib import Path

import httpx
import psycopg
import pytest
import torch

from demo.digits import DigitsCNN
from tests.e2e import start_network, stop_network

pytestmark = pytest.mark.e2e

GRACE = 2.0


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    net = start_network(tmp_path_factory.mktemp("heal"), agents=3, GRID_REPLICA_GRACE=str(GRACE))
    yield net
    stop_network(net)


def model_json(network, model_id: str) -> dict:
    response = httpx.get(f"{network.stack.url}/api/models/{model_id}/", headers={"Authorization": f"Bearer {network.token}"})
    response.raise_for_status()
    return response.json()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def ready_nodes(info: dict) -> set[str]:
    return {p["node_name"] for p in info["placements"] if p["status"] == "ready"}


def test_lost_replica_recreated(network):
    torch.manual_seed(2)
    model = DigitsCNN().eval()
    with network.client() as gateway:
        gateway.serve_model(model, "heal-me", allow_remote_inference=True, allow_download=True, replicas=2, example_inputs=torch.rand(2, 1, 8, 8), progress=False)
    before = ready_nodes(model_json(network, "heal-me"))
    victim = sorted(before)[0]
    network.stack.kill(victim, signal.SIGKILL)

    def healed():
        info = model_json(network, "heal-me")
        nodes = ready_nodes(info)
        return info if len(nodes - {victim}) == 2 else None

    info = wait_for(healed, GRACE + 30, "two ready replicas without the killed node")
    staging = Path(network.stack.env["GRID_STAGING_DIR"])
    assert info["health"] == "healthy"
    assert victim not in ready_nodes(info)
    wait_for(lambda: not any(staging.iterdir()), 10, "an empty staging folder")
    assert list(staging.iterdir()) == []
    with psycopg.connect(network.database_url) as conn:
        largest = conn.execute("SELECT max(pg_column_size(m.*)) FROM inference_model m").fetchone()[0]
    assert largest < info["size"]
    images = torch.rand(3, 1, 8, 8)
    with network.client() as gateway:
        remote = gateway.run_remote_inference(model_id="heal-me", dataset=images)
    assert torch.allclose(remote, model(images).detach(), atol=1e-5)
    network.start_agent(victim)
    network.wait_online(3)

    # The returning node's copy is surplus now: reconciliation evicts it.
    stale = network.data_root / victim / "models" / f"{info['sha256']}.pt2"
    wait_for(lambda: not stale.exists(), 20, "the returning node to evict its surplus copy")
    after = model_json(network, "heal-me")
    assert victim not in ready_nodes(after)
    assert len(ready_nodes(after)) == 2


def test_download_relays_from_replica(network):
    info = model_json(network, "heal-me")
    response = httpx.get(
        f"{network.stack.url}/api/models/heal-me/download/", headers={"Authorization": f"Bearer {network.token}"}, timeout=60
    )
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == info["sha256"]
    program = torch.export.load(io.BytesIO(response.content))
    assert program.module()(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_client_download_checks_hash(network, tmp_path):
    info = model_json(network, "heal-me")
    target = tmp_path / "copy.pt2"
    with network.client() as gateway:
        data = gateway.download_model("heal-me", target)
    assert hashlib.sha256(data).hexdigest() == info["sha256"]
    assert target.read_bytes() == data


def test_download_denied_without_flag(network):
    with network.client() as gateway:
        gateway.serve_model(DigitsCNN().eval(), "no-download", replicas=1, example_inputs=torch.rand(2, 1, 8, 8), progress=False)
    response = httpx.get(f"{network.stack.url}/api/models/no-download/download/", headers={"Authorization": f"Bearer {network.token}"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"


def test_delete_evicts_from_nodes(network):
    info = model_json(network, "no-download")
    holder = next(p["node_name"] for p in info["placements"] if p["status"] == "ready")
    with network.client() as gateway:
        gateway.delete_model("no-download")
    models_dir = network.data_root / holder / "models"
    wait_for(lambda: not (models_dir / f"{info['sha256']}.pt2").exists(), 20, "the evicted model file to disappear")
    response = httpx.get(f"{network.stack.url}/api/models/no-download/", headers={"Authorization": f"Bearer {network.token}"})
    assert response.status_code == 404
    assert not (models_dir / f"{info['sha256']}.pt2").exists()
