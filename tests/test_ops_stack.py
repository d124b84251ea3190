"""Operations on a real stack with two gateway processes.

Agents connect to gateway 1 and know gateway 2; the client talks to gateway 2.
Covers readiness, metrics after traffic, scale-out across gateway processes,
and SIGTERM of gateway 1 under load. The SIGTERM test ends gateway 1, so it
runs last.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from gridsite.stack import free_port
from tests.e2e import start_network, stop_network

pytestmark = pytest.mark.e2e

MODEL = "ops-tiny"


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    # Each inference takes at least 20 ms, so SIGTERM lands on requests in flight.
    net = start_network(tmp_path_factory.mktemp("ops"), agents=3, agent_env={"GRID_AGENT_DELAY_MS": "20"}, gateways=2)
    yield net
    stop_network(net)


@pytest.fixture(scope="module")
def gateway2(network) -> str:
    return network.gateway_urls[1]


@pytest.fixture(scope="module")
def model(network, gateway2):
    torch.manual_seed(3)
    module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with network.client(gateway2) as client:
        client.serve_model(module, MODEL, allow_remote_inference=True, replicas=2, example_inputs=torch.rand(2, 4), progress=False)
    return module


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Return every sample of GET url/metrics, keyed by name and label set."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def log_text(network, name: str) -> str:
    return (network.stack.log_dir / f"{name}.log").read_text(errors="replace")


def start_broken_gateway(network, name: str, **env: str) -> str:
    return network.stack.start_gateway(name=name, port=free_port(), env=env)


def test_readyz_ready(network):
    response = httpx.get(f"{network.stack.url}/readyz", timeout=10)
    checks = response.json()["checks"]

    assert response.status_code == 200
    assert checks["postgres"]["ok"] is True
    assert checks["redis"]["ok"] is True
    assert checks["broker"]["ok"] is True


def test_readyz_names_redis(network):
    url = start_broken_gateway(network, "gateway-no-redis", GRID_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    try:
        health = httpx.get(f"{url}/healthz", timeout=10)
        ready = httpx.get(f"{url}/readyz", timeout=10)
    finally:
        network.stack.kill("gateway-no-redis")
    body = ready.json()

    assert health.status_code == 200
    assert ready.status_code == 503
    assert body["error"]["code"] == "not_ready"
    assert body["error"]["field"] == "redis"
    assert body["checks"]["redis"]["ok"] is False
    assert body["checks"]["postgres"]["ok"] is True


def test_readyz_names_postgres(network):
    url = start_broken_gateway(network, "gateway-no-pg", GRID_DATABASE_URL=f"postgres://postgres@127.0.0.1:{free_port()}/grid")
    try:
        health = httpx.get(f"{url}/healthz", timeout=10)
        ready = httpx.get(f"{url}/readyz", timeout=10)
    finally:
        network.stack.kill("gateway-no-pg")
    body = ready.json()

    assert health.status_code == 200
    assert ready.status_code == 503
    assert body["error"]["field"] == "postgres"
    assert body["checks"]["redis"]["ok"] is True


def test_static_file_served(network):
    response = httpx.get(f"{network.stack.url}/static/admin/css/base.css", timeout=10)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/css")
    assert "body" in response.text


def test_agents_on_first_gateway(network):
    first = network.gateway_urls[0].replace("http://", "ws://")
    second = network.gateway_urls[1].replace("http://", "ws://")

    for name in network.node_tokens:
        log = log_text(network, name)
        assert f"connected to {first}/ws/agent/" in log, name
        assert f"connected to {second}/ws/agent/" not in log, name


def test_second_gateway_serves_inference(network, gateway2, model):
    inputs = torch.rand(16, 4)
    with network.client(gateway2) as client:
        remote, info = client.run_remote_inference_with_info(model_id=MODEL, dataset=inputs)
    with torch.inference_mode():
        local = model(inputs)

    assert remote.shape == (16, 3)
    assert torch.allclose(remote, local, atol=1e-5)
    assert info.node in network.node_tokens


def test_metrics_after_traffic(network, gateway2, model):
    before = scrape(gateway2)
    with network.client(gateway2) as client:
        for _ in range(5):
            client.run_remote_inference(model_id=MODEL, dataset=torch.rand(1, 4))
    after = scrape(gateway2)
    first = scrape(network.gateway_urls[0])

    requests = sample(after, "grid_inference_request_seconds_count", model=MODEL, status="200")
    jobs = sample(after, "grid_inference_job_seconds_count", model=MODEL, outcome="succeeded")
    assert requests - sample(before, "grid_inference_request_seconds_count", model=MODEL, status="200") == 5
    assert jobs - sample(before, "grid_inference_job_seconds_count", model=MODEL, outcome="succeeded") == 5
    assert sample(after, "grid_nodes", status="online") == 3
    assert sample(after, "grid_placements", state="ready") == 2
    assert ("grid_celery_queue_depth", frozenset()) in after
    assert sample(first, "grid_heartbeat_lag_seconds_count") > 0
    assert sample(first, "grid_inference_request_seconds_count", model=MODEL, status="200") == 0


def test_sigterm_gateway_under_load(network, gateway2, model):
    """SIGTERM the gateway holding every agent while requests go to the other one."""
    images = torch.rand(120, 4)
    with torch.inference_mode():
        expected = model(images)
    outcomes: list[tuple[int, bool, str]] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        with network.client(gateway2, retries=0) as client:
            try:
                out = client.run_remote_inference(model_id=MODEL, dataset=images[index : index + 1])
                row = (index, torch.allclose(out, expected[index : index + 1], atol=1e-5), "")
            except Exception as exc:
                row = (index, False, repr(exc))
        with lock:
            outcomes.append(row)

    gateway1 = network.stack.processes["gateway"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = []
        for index in range(len(images)):
            if index == 30:
                network.stack.kill("gateway", signal.SIGTERM)
                signalled = time.monotonic()
            futures.append(pool.submit(one, index))
            time.sleep(0.01)
        for future in futures:
            future.result()
    gateway1.wait(timeout=30)
    shutdown_seconds = time.monotonic() - signalled
    failures = [o for o in outcomes if not o[1]]

    assert len(outcomes) == 120
    assert failures == []
    assert shutdown_seconds < 20
    assert "drained 3 agent connections" in log_text(network, "gateway")
    for name in network.node_tokens:
        assert "closed: code 1001" in log_text(network, name), name

    # Every job row ends succeeded, or failed with a reason; none is left behind.
    deadline = time.monotonic() + 30
    while True:
        with psycopg.connect(network.database_url) as conn:
            open_jobs = conn.execute("SELECT count(*) FROM inference_inferencejob WHERE status IN ('queued', 'running')").fetchone()[0]
            failed = conn.execute("SELECT error_code, error FROM inference_inferencejob WHERE status = 'failed'").fetchall()
        if open_jobs == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert open_jobs == 0
    for code, error in failed:
        assert code != ""
        assert error != ""

    with network.client(gateway2) as client:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            online = [n for n in client.connected_nodes() if n["status"] == "online"]
            if len(online) == 3:
                break
            time.sleep(0.2)
    assert len(online) == 3
