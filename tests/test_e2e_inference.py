"""End to end: real gateway, Celery and agent processes, a real torch model."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import torch

from demo.digits import DigitsCNN
from tests.e2e import start_network, stop_network
from tests.faults import db_now, settled_ledger

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    # Each request takes at least 30 ms on a node, so a kill lands on requests in flight.
    net = start_network(tmp_path_factory.mktemp("grid"), agents=3, agent_env={"GRID_AGENT_DELAY_MS": "30"})
    yield net
    stop_network(net)


@pytest.fixture(scope="module")
def served(network):
    torch.manual_seed(1)
    model = DigitsCNN().eval()
    with network.client() as gateway:
        info = gateway.serve_model(
            model, "digits-e2e", allow_remote_inference=True, replicas=2, example_inputs=torch.rand(4, 1, 8, 8), progress=False
        )
    return model, info


def test_serve_places_two_replicas(network, served):
    _, info = served
    with network.client() as gateway:
        holders = gateway.search_model("digits-e2e")
    assert info.status == "ready"
    assert len({p.node_name for p in holders}) == 2


def test_staging_empty_after_placement(network, served):
    staging = Path(network.stack.env["GRID_STAGING_DIR"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(staging.iterdir()):
        time.sleep(0.1)
    leftovers = [p.name for p in staging.iterdir()]
    assert leftovers == []


def test_postgres_holds_no_model_bytes(network, served):
    _, info = served
    with psycopg.connect(network.database_url) as conn:
        largest = conn.execute("SELECT max(pg_column_size(m.*)) FROM inference_model m").fetchone()[0]
    assert largest < info.size


def test_inference_matches_local_model(network, served):
    model, _ = served
    images = torch.rand(16, 1, 8, 8)
    with network.client() as gateway:
        remote = gateway.run_remote_inference(model_id="digits-e2e", dataset=images)
    with torch.inference_mode():
        local = model(images)
    assert remote.shape == (16, 10)
    assert torch.allclose(remote, local, atol=1e-5)


def test_wrong_dtype_rejected_before_nodes(network, served):
    import gridclient as gr

    with network.client() as gateway:
        with pytest.raises(gr.InvalidInput) as caught:
            gateway.run_remote_inference(model_id="digits-e2e", dataset=torch.zeros(2, 1, 8, 8, dtype=torch.float64))
    assert caught.value.status == 400
    assert "float32" in caught.value.message


def test_pickle_upload_rejected(network, tmp_path):
    import httpx

    marker = tmp_path / "pwned"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    response = httpx.post(
        f"{network.stack.url}/api/models/",
        headers={"Authorization": f"Bearer {network.token}"},
        data={"model_id": "evil", "input_signature": '[{"name": "x", "dtype": "float32", "shape": [null, 2]}]'},
        files={"file": ("evil.pt2", payload)},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_model"
    assert not marker.exists()


def test_kill_replica_under_load(network, served):
    """SIGKILL a node holding the model while 4 threads send requests."""
    model, _ = served
    images = torch.rand(200, 1, 8, 8)
    with torch.inference_mode():
        expected = model(images).argmax(1)
    with network.client() as gateway:
        victim = sorted(p.node_name for p in gateway.search_model("digits-e2e"))[0]
    outcomes: list[tuple[int, bool, str]] = []
    lock = threading.Lock()
    since = db_now(network)

    def one(index: int) -> None:
        with network.client() as gateway:
            try:
                out = gateway.run_remote_inference(model_id="digits-e2e", dataset=images[index : index + 1])
                row = (index, out.argmax(1).item() == expected[index].item(), "")
            except Exception as exc:
                row = (index, False, repr(exc))
        with lock:
            outcomes.append(row)

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = []
        for index in range(len(images)):
            if index == 60:
                network.stack.kill(victim, signal.SIGKILL)
            futures.append(pool.submit(one, index))
            time.sleep(0.005)
        for future in futures:
            future.result()

    failures = [o for o in outcomes if not o[1]]
    # Every job the gateway accepted ended, with a reason when it failed.
    ledger = settled_ledger(network, since)
    assert len(outcomes) == 200
    assert failures == []
    assert ledger.open == 0
    assert ledger.unexplained == []
    assert ledger.statuses["succeeded"] == 200
    with network.client() as gateway:
        status = {n["name"]: n["status"] for n in gateway.connected_nodes()}
    assert status[victim] == "offline"
    network.start_agent(victim, GRID_AGENT_DELAY_MS="30")
    network.wait_online(3)
