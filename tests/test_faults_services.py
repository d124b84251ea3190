"""Redis and PostgreSQL outages under a real stack, on private servers of its own.

The stack uses a Redis and a PostgreSQL started for this module on free
ports, never the machine's shared servers, so the tests can stop and restart
them. While one is down the API returns 503 naming it. Once it is back, new
inferences succeed with no manual step, and every job ends succeeded or
failed with a reason.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest
import torch

from tests.e2e import start_network
from tests.faults import (
    db_now,
    infer,
    log_text,
    serve,
    settled_ledger,
    tiny_model,
    wait_for,
)
from tests.private_services import PrivatePostgres, PrivateRedis

pytestmark = pytest.mark.e2e

MODEL = "outage-tiny"
ATTEMPT_TIMEOUT = 2.0
# Extra seconds allowed for a loaded two-core machine.
SLACK = 3.0
# Codes of requests that failed before a job was created.
NO_JOB = {"redis_unavailable", "database_unavailable"}


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outage")
    redis_server = PrivateRedis(tmp / "redis")
    postgres = PrivatePostgres()
    redis_server.start()
    net = None
    try:
        postgres.init()
        postgres.start()
        net = start_network(
            tmp,
            agents=2,
            GRID_DATABASE_URL=postgres.url("grid_outage"),
            GRID_REDIS_URL=redis_server.url,
            GRID_ATTEMPT_TIMEOUT=str(ATTEMPT_TIMEOUT),
            GRID_INFER_TIMEOUT="10",
            # No other gateway process takes the agents at the end, so do not wait for one.
            GRID_SHUTDOWN_DRAIN="1",
        )
        net.redis_server = redis_server
        net.postgres = postgres
        serve(net, tiny_model(), MODEL, replicas=2)
        yield net
    finally:
        # The database goes with the private cluster, so it is not dropped first.
        if net is not None:
            net.stack.stop()
        redis_server.stop()
        postgres.remove()


def call(network, path: str) -> httpx.Response:
    return httpx.get(f"{network.stack.url}{path}", headers={"Authorization": f"Bearer {network.token}"}, timeout=30)


def one(network, timeout: float = 30.0):
    return infer(network.stack.url, network.token, MODEL, torch.rand(1, 4), timeout=timeout)


def sweeps_done(network) -> int:
    """How many node sweeps the worker has finished, from its log."""
    return len(re.findall(r"sweep_nodes\[[^\]]+\] succeeded", log_text(network, "worker")))


def outcomes_of_replies(replies) -> Counter:
    return Counter("succeeded" if r.ok else r.error_code for r in replies if r.error_code not in NO_JOB)


def outcomes_of_rows(network, since) -> Counter:
    with psycopg.connect(network.database_url) as conn:
        rows = conn.execute("SELECT status, error_code FROM inference_inferencejob WHERE created >= %s", (since,)).fetchall()
    return Counter(status if status == "succeeded" else code for status, code in rows)


def test_redis_down_answers_503(network):
    since = db_now(network)
    network.redis_server.kill()
    try:
        during = one(network)
        listing = call(network, "/api/models/")
    finally:
        network.redis_server.start()
    before = sweeps_done(network)
    recovered = wait_for(lambda: (reply := one(network)).ok and reply, "an inference after Redis restarted", timeout=40, interval=0.5)
    after = [one(network) for _ in range(10)]
    wait_for(lambda: sweeps_done(network) > before + 2, "node sweeps run again", timeout=20)
    ledger = settled_ledger(network, since)

    assert during.status == 503
    assert during.error_code == "redis_unavailable"
    assert during.retry_after == "5"
    # Reads from PostgreSQL go on: the rate limit lets requests through when Redis fails.
    assert listing.status_code == 200
    assert recovered.status == 200
    assert [r.status for r in after] == [200] * 10
    assert ledger.open == 0
    assert ledger.unexplained == []


def test_redis_quick_restart(network):
    """Redis restarts between two heartbeats: sockets stay open but every key is gone."""
    since = db_now(network)
    network.redis_server.kill()
    network.redis_server.start()
    replies = [one(network) for _ in range(6)]
    recovered = wait_for(lambda: (reply := one(network)).ok and reply, "an inference after Redis restarted", timeout=20, interval=0.5)
    after = [one(network) for _ in range(10)]
    ledger = settled_ledger(network, since)

    told = outcomes_of_replies([*replies, recovered, *after])
    recorded = outcomes_of_rows(network, since)

    assert max(r.seconds for r in replies) < ATTEMPT_TIMEOUT + SLACK
    # Every job's outcome reached its client, even when its job.done message was lost.
    assert recorded - told == Counter()
    # Replies without a job: requests rejected before a job was created.
    assert set(told - recorded) <= {"no_replica", "busy"}
    assert recovered.status == 200
    assert [r.status for r in after] == [200] * 10
    assert ledger.open == 0
    assert ledger.unexplained == []


def test_postgres_down_answers_503(network):
    since = db_now(network)
    network.postgres.stop("immediate")
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            during = pool.submit(one, network)
            listing = pool.submit(call, network, "/api/models/")
            during, listing = during.result(), listing.result()
    finally:
        network.postgres.start()
    before = sweeps_done(network)
    recovered = wait_for(lambda: (reply := one(network)).ok and reply, "an inference after PostgreSQL restarted", timeout=40, interval=0.5)
    after = [one(network) for _ in range(10)]
    wait_for(lambda: sweeps_done(network) > before + 2, "node sweeps run again", timeout=20)
    ledger = settled_ledger(network, since)

    assert during.status == 503
    assert during.error_code == "database_unavailable"
    assert during.retry_after == "5"
    assert listing.status_code == 503
    assert listing.json()["error"]["code"] == "database_unavailable"
    assert "PostgreSQL" in listing.json()["error"]["message"]
    assert listing.headers["Retry-After"] == "5"
    assert recovered.status == 200
    assert [r.status for r in after] == [200] * 10
    assert ledger.open == 0
    assert ledger.unexplained == []


def test_postgres_restart_drops_dead_connections(network):
    """A quick restart kills every pooled connection; at most one request notices."""
    since = db_now(network)
    with ThreadPoolExecutor(max_workers=8) as pool:
        warm = list(pool.map(lambda _: one(network), range(40)))
    network.postgres.stop("immediate")
    network.postgres.start()
    replies = [one(network) for _ in range(10)]
    ledger = settled_ledger(network, since)
    answered = [r for r in [*warm, *replies] if r.ok]

    assert [r.status for r in warm] == [200] * 40
    assert [r.error_code for r in replies if not r.ok] in ([], ["database_unavailable"])
    assert [r.status for r in replies[1:]] == [200] * 9
    assert ledger.statuses["succeeded"] == len(answered)
    assert ledger.total == len(answered)
    assert json.loads(call(network, "/readyz").text)["status"] == "ready"
