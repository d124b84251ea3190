"""Helpers for the fault tests: raw inference calls, job accounting, sockets, polling.

Inference goes through httpx with no retries, so a test gets every failure
the gateway returns. The client library would retry some of them.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import psycopg
import torch
from safetensors.torch import load, save
from torch import nn

from tests.e2e import Network

T = TypeVar("T")

SAFETENSORS = "application/vnd.safetensors"


def tiny_model(seed: int = 5) -> nn.Module:
    """A model taking ``input`` of shape (batch, 4) and returning (batch, 3)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def serve(network: Network, model: nn.Module, model_id: str, replicas: int) -> None:
    with network.client() as client:
        client.serve_model(model, model_id, allow_remote_inference=True, replicas=replicas, example_inputs=torch.rand(2, 4), progress=False)


@dataclass(frozen=True)
class Reply:
    """One inference request as the client saw it. ``status`` is None when no response came."""

    status: int | None
    seconds: float
    attempts: int
    node: str
    job_id: str
    error_code: str
    output: torch.Tensor | None
    retry_after: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


def infer(url: str, token: str, model_id: str, inputs: torch.Tensor, timeout: float = 30.0) -> Reply:
    """Send one inference request and record what came back, or that nothing did."""
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": SAFETENSORS}
    try:
        response = httpx.post(f"{url}/api/models/{model_id}/infer/", content=save({"input": inputs}), headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return Reply(None, time.monotonic() - started, 0, "", "", type(exc).__name__, None)
    seconds = time.monotonic() - started
    if response.status_code != 200:
        try:
            code = response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = f"unparsed: {response.text[:200]}"
        return Reply(response.status_code, seconds, 0, "", "", code, None, response.headers.get("Retry-After", ""))
    return Reply(
        200,
        seconds,
        int(response.headers["X-Grid-Attempts"]),
        response.headers["X-Grid-Node"],
        response.headers["X-Grid-Job-Id"],
        "",
        load(response.content)["output"],
    )


def wait_for(check: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.1) -> T:
    """Poll ``check`` until it returns a true value and return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last value {value!r})")
        time.sleep(interval)


def db_now(network: Network) -> dt.datetime:
    with psycopg.connect(network.database_url) as conn:
        return conn.execute("SELECT now()").fetchone()[0]


@dataclass(frozen=True)
class Ledger:
    """The inference job rows created since a moment, by outcome."""

    statuses: Counter
    # (error_code, error) of every failed job.
    failures: list[tuple[str, str]]
    # Attempts of every succeeded job.
    attempts: list[int]

    @property
    def open(self) -> int:
        return self.statuses["queued"] + self.statuses["running"]

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def unexplained(self) -> list[tuple[str, str]]:
        """Failed jobs that carry no code or no message."""
        return [(code, error) for code, error in self.failures if not code or not error]


def ledger(network: Network, since: dt.datetime) -> Ledger:
    with psycopg.connect(network.database_url) as conn:
        rows = conn.execute("SELECT status, error_code, error, attempts FROM inference_inferencejob WHERE created >= %s", (since,)).fetchall()
    return Ledger(
        statuses=Counter(status for status, _, _, _ in rows),
        failures=[(code, error) for status, code, error, _ in rows if status == "failed"],
        attempts=[attempts for status, _, _, attempts in rows if status == "succeeded"],
    )


def settled_ledger(network: Network, since: dt.datetime, timeout: float = 30.0) -> Ledger:
    """Wait until no job created since ``since`` is queued or running, and return the rows."""
    wait_for(lambda: ledger(network, since).open == 0, "every job succeeded or failed", timeout=timeout, interval=0.2)
    return ledger(network, since)


def job_ids(network: Network, since: dt.datetime) -> set[str]:
    with psycopg.connect(network.database_url) as conn:
        return {str(pk) for (pk,) in conn.execute("SELECT id FROM inference_inferencejob WHERE created >= %s", (since,)).fetchall()}


def running_jobs(network: Network) -> int:
    with psycopg.connect(network.database_url) as conn:
        return conn.execute("SELECT count(*) FROM inference_inferencejob WHERE status = 'running'").fetchone()[0]


def node_statuses(network: Network) -> dict[str, str]:
    with psycopg.connect(network.database_url) as conn:
        return dict(conn.execute("SELECT name, status FROM registry_node").fetchall())


def ready_replicas(network: Network, model_id: str) -> list[str]:
    """Names of the online nodes holding a ready replica of the model's active version."""
    query = """
        SELECT n.name FROM inference_placement p
        JOIN inference_model m ON m.id = p.model_id
        JOIN registry_node n ON n.id = p.node_id
        WHERE m.model_id = %s AND p.sha256 = m.sha256 AND p.status = 'ready' AND n.status = 'online'
        ORDER BY n.name
    """
    with psycopg.connect(network.database_url) as conn:
        return [name for (name,) in conn.execute(query, (model_id,)).fetchall()]


def gateway_port(network: Network) -> int:
    return network.stack.port


def established_sockets(pid: int, port: int) -> int:
    """Count the TCP connections process ``pid`` has open to 127.0.0.1:``port``.

    Matches the socket inodes among the process's file descriptors with the
    ESTABLISHED entries of /proc/net/tcp whose remote port is ``port``.
    """
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if fields[3] == "01" and remote_port == port and fields[9] in inodes:
                count += 1
    return count


def process_exited(network: Network, name: str) -> int | None:
    """Return the exit code of a stack process, or None while it runs."""
    return network.stack.processes[name].poll()


def log_text(network: Network, name: str) -> str:
    return (network.stack.log_dir / f"{name}.log").read_text(errors="replace")
