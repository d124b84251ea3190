"""Faults of Grid's own processes on one real stack: agents, the worker, the gateway.

Three agents have a replica each. The tests freeze an agent, run two agents
on one token and open a second socket for a node. They also kill the Celery
worker in the middle of a placement, SIGKILL the gateway under load, and feed
an input that crashes every agent it reaches. After each fault every job
created since it began must have succeeded or failed with a code and a message.

A SIGKILL of an agent under load is in tests/test_e2e_inference.py.
"""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gridproto import PROTOCOL_VERSION
from gridsite.stack import celery_commands
from tests.e2e import start_network, stop_network
from tests.faults import (
    db_now,
    established_sockets,
    infer,
    job_ids,
    log_text,
    node_statuses,
    ready_replicas,
    running_jobs,
    serve,
    settled_ledger,
    tiny_model,
    wait_for,
)
from tests.models import export_bytes

pytestmark = pytest.mark.e2e

MODEL = "faults-tiny"
HEARTBEAT = 0.5
ATTEMPT_TIMEOUT = 2.0
MAX_ATTEMPTS = 2
PLACEMENT_TIMEOUT = 8.0
# Extra seconds allowed for a loaded two-core machine.
SLACK = 2.5
AGENT_ENV = {"GRID_AGENT_DELAY_MS": "30"}


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    net = start_network(
        tmp_path_factory.mktemp("faults"),
        agents=3,
        agent_env=AGENT_ENV,
        GRID_HEARTBEAT_INTERVAL=str(HEARTBEAT),
        GRID_ATTEMPT_TIMEOUT=str(ATTEMPT_TIMEOUT),
        GRID_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
        GRID_PLACEMENT_TIMEOUT=str(PLACEMENT_TIMEOUT),
        GRID_INFER_TIMEOUT="15",
        # No other gateway process takes the agents at the end, so do not wait for one.
        GRID_SHUTDOWN_DRAIN="1",
    )
    net.model = tiny_model()
    serve(net, net.model, MODEL, replicas=3)
    yield net
    stop_network(net)


def send_under_load(network, inputs: torch.Tensor, fault_at: int, fault, timeout: float = 20.0) -> list:
    """Send one request per row from 4 threads, calling ``fault()`` before row ``fault_at``."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = []
        for index in range(len(inputs)):
            if index == fault_at:
                fault()
            futures.append(pool.submit(infer, network.stack.url, network.token, MODEL, inputs[index : index + 1], timeout))
            time.sleep(0.02)
        return [future.result() for future in futures]


def restart_agents(network, **env: str) -> None:
    """SIGKILL every agent and start them all again with ``env`` added."""
    for name in network.node_tokens:
        if network.stack.processes[name].poll() is None:
            network.stack.kill(name, signal.SIGKILL)
    for name in network.node_tokens:
        network.start_agent(name, **{**AGENT_ENV, **env})


def hello_for(network, name: str) -> dict:
    """The hello an agent named ``name`` sends: the model files its node holds."""
    query = "SELECT DISTINCT p.sha256 FROM inference_placement p JOIN registry_node n ON n.id = p.node_id WHERE n.name = %s AND p.status = 'ready'"
    with psycopg.connect(network.database_url) as conn:
        held = [sha for (sha,) in conn.execute(query, (name,)).fetchall()]
    return {
        "type": "hello",
        "protocol": PROTOCOL_VERSION,
        "name": name,
        "capabilities": {"device": "cpu", "cpu_count": 1, "memory_bytes": 1 << 30},
        "concurrency": 1,
        "models": [{"sha256": sha, "size": 0} for sha in held],
    }


def test_frozen_agent_fails_over(network):
    """SIGSTOP a node in the middle of a load: its socket stays open but goes silent."""
    since = db_now(network)
    victim = "node-2"
    inputs = torch.rand(60, 4)
    with torch.inference_mode():
        expected = network.model(inputs)
    try:
        replies = send_under_load(network, inputs, 15, lambda: network.stack.kill(victim, signal.SIGSTOP))
        status_while_frozen = node_statuses(network)[victim]
    finally:
        network.stack.kill(victim, signal.SIGCONT)
    ledger = settled_ledger(network, since)
    limit = 3 * HEARTBEAT + ATTEMPT_TIMEOUT + SLACK

    assert [r.status for r in replies] == [200] * 60
    assert max(r.seconds for r in replies) < limit
    assert max(r.attempts for r in replies) == 2
    for index, reply in enumerate(replies):
        assert torch.allclose(reply.output, expected[index : index + 1], atol=1e-5), index
    assert status_while_frozen == "offline"
    assert ledger.statuses["succeeded"] == 60
    assert ledger.total == 60
    wait_for(lambda: node_statuses(network)[victim] == "online", f"{victim} online after SIGCONT")
    wait_for(lambda: victim in ready_replicas(network, MODEL), f"{victim} ready again")


def test_twin_agents_share_token(network, tmp_path):
    """A second agent process with node-1's token: they take turns, jobs keep succeeding."""
    since = db_now(network)
    twin = network.stack.start_agent("node-1-twin", network.node_tokens["node-1"], tmp_path / "twin")
    wait_for(lambda: "welcomed as node" in log_text(network, "node-1-twin"), "the twin connected")
    wait_for(lambda: "(4409)" in log_text(network, "node-1"), "node-1 superseded by its twin")
    replies = [infer(network.stack.url, network.token, MODEL, torch.rand(1, 4)) for _ in range(10)]
    network.stack.kill("node-1-twin", signal.SIGTERM)
    twin.wait(timeout=20)
    agent = network.stack.processes["node-1"].pid

    wait_for(lambda: node_statuses(network)["node-1"] == "online", "node-1 online", timeout=40)
    wait_for(lambda: established_sockets(agent, network.stack.port) == 1, "node-1 agent connected", timeout=40)
    wait_for(lambda: "node-1" in ready_replicas(network, MODEL), "node-1 replica ready again", timeout=40)
    after = [infer(network.stack.url, network.token, MODEL, torch.rand(1, 4)) for _ in range(10)]
    ledger = settled_ledger(network, since)

    assert [r.status for r in replies] == [200] * 10
    assert [r.status for r in after] == [200] * 10
    assert twin.returncode == 0
    assert node_statuses(network)["node-1"] == "online"
    assert established_sockets(agent, network.stack.port) == 1
    assert ledger.statuses["succeeded"] == 20
    assert ledger.total == 20


def test_second_socket_for_node(network):
    """A second socket for node-3 takes over; the agent reconnects and takes it back."""
    since = db_now(network)
    url = network.stack.url.replace("http://", "ws://") + "/ws/agent/"
    headers = {"Authorization": f"Bearer {network.node_tokens['node-3']}"}
    agent = network.stack.processes["node-3"].pid
    superseded_before = log_text(network, "node-3").count("(4409)")
    close_code = None
    with connect(url, additional_headers=headers, compression=None) as socket:
        socket.send(json.dumps(hello_for(network, "node-3")))
        welcome = json.loads(socket.recv(timeout=10))
        deadline = time.monotonic() + 30
        sequence = 0
        # Heartbeats keep this socket alive until the agent's reconnect closes it.
        while time.monotonic() < deadline:
            sequence += 1
            try:
                socket.send(json.dumps({"type": "heartbeat", "seq": sequence, "in_flight": 0}))
                socket.recv(timeout=0.2)
            except TimeoutError:
                continue
            except ConnectionClosed as exc:
                close_code = exc.rcvd.code if exc.rcvd else None
                break
    wait_for(lambda: established_sockets(agent, network.stack.port) == 1, "node-3 agent connected")
    replies = [infer(network.stack.url, network.token, MODEL, torch.rand(1, 4)) for _ in range(30)]
    ledger = settled_ledger(network, since)

    assert welcome["type"] == "welcome"
    assert log_text(network, "node-3").count("(4409)") == superseded_before + 1
    assert close_code == 4409
    assert node_statuses(network)["node-3"] == "online"
    assert established_sockets(agent, network.stack.port) == 1
    assert [r.status for r in replies] == [200] * 30
    assert "node-3" in {r.node for r in replies}
    assert ledger.statuses["succeeded"] == 30
    assert ledger.total == 30


def placement_rows(network, model_id: str) -> list[tuple[str, str]]:
    query = """
        SELECT n.name, p.status FROM inference_placement p
        JOIN inference_model m ON m.id = p.model_id JOIN registry_node n ON n.id = p.node_id
        WHERE m.model_id = %s ORDER BY n.name
    """
    with psycopg.connect(network.database_url) as conn:
        return conn.execute(query, (model_id,)).fetchall()


def model_state(network, model_id: str) -> dict:
    response = httpx.get(f"{network.stack.url}/api/models/{model_id}/", headers={"Authorization": f"Bearer {network.token}"}, timeout=10)
    return response.json()


def test_worker_killed_mid_placement(network):
    """SIGKILL the worker while its placement task waits on PostgreSQL; a new worker finishes the job."""
    signature = json.dumps([{"name": "input", "dtype": "float32", "shape": [None, 4]}])
    blocked = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO \"inference_placement\"%%'"
    with psycopg.connect(network.database_url) as holder, psycopg.connect(network.database_url, autocommit=True) as watcher:
        # Inserts into inference_placement wait behind this lock; reads go on.
        holder.execute("LOCK TABLE inference_placement IN EXCLUSIVE MODE")
        response = httpx.post(
            f"{network.stack.url}/api/models/",
            headers={"Authorization": f"Bearer {network.token}"},
            data={"model_id": "faults-late", "input_signature": signature, "replicas": "2", "allow_remote_inference": "true"},
            files={"file": ("late.pt2", export_bytes())},
            timeout=30,
        )
        wait_for(lambda: watcher.execute(blocked).fetchone()[0] > 0, "the placement task blocked on the lock")
        network.stack.kill("worker", signal.SIGKILL)
        holder.rollback()
    lost = placement_rows(network, "faults-late")
    waiting = model_state(network, "faults-late")
    network.stack.start("worker", celery_commands(network.stack.log_dir / "celerybeat-schedule")["worker"])
    final = wait_for(
        lambda: (state := model_state(network, "faults-late"))["status"] in ("ready", "failed", "degraded") and state,
        "placement ended",
        timeout=PLACEMENT_TIMEOUT * 2 + 20,
    )

    assert response.status_code == 201
    assert lost == []
    assert waiting["status"] == "placing"
    assert final["status"] == "ready"
    assert final["ready_replicas"] == 2
    assert len([status for _, status in placement_rows(network, "faults-late") if status == "ready"]) == 2
    assert "starting its placement again" in log_text(network, "worker")


def test_gateway_killed_under_load(network):
    """SIGKILL the gateway and node-3's agent with jobs in flight, then restart the gateway."""
    since = db_now(network)
    inputs = torch.rand(40, 4)

    def crash() -> None:
        # Strike while a node computes, so the client of that job never hears of it.
        wait_for(lambda: running_jobs(network) > 0, "a job running", interval=0.005)
        network.stack.kill("gateway", signal.SIGKILL)
        network.stack.kill("node-3", signal.SIGKILL)

    replies = send_under_load(network, inputs, 20, crash, timeout=20)
    network.stack.start_gateway()
    # No process has node-3's socket and nothing closed it, so only the sweep can see it is gone.
    wait_for(lambda: node_statuses(network)["node-3"] == "offline", "node-3 offline", timeout=20)
    wait_for(lambda: all(node_statuses(network)[n] == "online" for n in ("node-1", "node-2")), "node-1 and node-2 online", timeout=40)
    ledger = settled_ledger(network, since, timeout=40)
    after = [infer(network.stack.url, network.token, MODEL, torch.rand(1, 4)) for _ in range(10)]
    answered = [r for r in replies if r.status == 200]
    unanswered = job_ids(network, since) - {r.job_id for r in answered + after}

    assert len(answered) > 0
    assert len(unanswered) > 0
    assert ledger.open == 0
    assert ledger.unexplained == []
    assert ledger.statuses["succeeded"] >= len(answered)
    assert ledger.statuses["succeeded"] + ledger.statuses["failed"] == ledger.total
    assert [r.status for r in after] == [200] * 10
    assert {r.node for r in after} <= {"node-1", "node-2"}
    network.start_agent("node-3", **AGENT_ENV)
    network.wait_online(3)


def test_crashing_input_bounded(network):
    """Every agent exits on an inference request: the job stops after MAX_ATTEMPTS nodes."""
    restart_agents(network, GRID_AGENT_FAULT="crash-on-infer")
    network.wait_online(3)
    wait_for(lambda: len(ready_replicas(network, MODEL)) == 3, "three replicas ready", timeout=40)
    since = db_now(network)
    reply = infer(network.stack.url, network.token, MODEL, torch.rand(1, 4))
    time.sleep(3 * HEARTBEAT)
    exited = {name: process.poll() for name, process in network.stack.processes.items() if name in network.node_tokens}
    ledger = settled_ledger(network, since)

    assert reply.status == 503
    assert reply.error_code == "attempts_exhausted"
    assert sorted(code for code in exited.values() if code is not None) == [1] * MAX_ATTEMPTS
    assert list(exited.values()).count(None) == 3 - MAX_ATTEMPTS
    assert ledger.statuses["failed"] == 1
    assert ledger.total == 1
    assert ledger.failures[0][0] == "attempts_exhausted"
    assert f"failed on {MAX_ATTEMPTS} nodes" in ledger.failures[0][1]
