"""Shared set-up for end-to-end tests: a real stack of Grid processes."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gridsite.stack import ROOT, Stack, drop_database, ensure_database, free_port


@dataclass
class Network:
    stack: Stack
    token: str
    node_tokens: dict[str, str]
    data_root: Path
    database_url: str
    # Every gateway process's URL; agents get them all, in this order.
    gateway_urls: list[str] = field(default_factory=list)

    def start_agent(self, name: str, **env: str):
        gateways = ",".join(self.gateway_urls) or None
        return self.stack.start_agent(name, self.node_tokens[name], self.data_root / name, extra_env=env, gateway=gateways)

    def client(self, url: str | None = None, **options):
        import gridclient as gr

        return gr.GridNetwork(url or self.stack.url, token=self.token, **options)

    def wait_online(self, count: int, timeout: float = 30.0) -> list[dict]:
        with self.client() as gateway:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                online = [n for n in gateway.connected_nodes() if n["status"] == "online"]
                if len(online) >= count:
                    return online
                time.sleep(0.1)
        raise AssertionError(f"{count} nodes did not come online within {timeout} s; logs in {self.stack.log_dir}")


def start_network(
    tmp: Path,
    agents: int = 3,
    agent_env: dict[str, str] | None = None,
    gateways: int = 1,
    prepare_node: Callable[[str, Path], None] | None = None,
    **settings: str,
) -> Network:
    """Start a gateway, a worker, beat and ``agents`` agents on a fresh database.

    With ``gateways`` above 1, further gateway processes named gateway2...
    run on their own ports, sharing the database, Redis and staging directory,
    and agents are given every gateway URL, the first gateway's first.
    ``prepare_node(name, data_dir)`` runs for each agent before it starts, to
    put files such as datasets in its data directory.
    """
    suffix = uuid.uuid4().hex[:10]
    # A GRID_DATABASE_URL in ``settings`` (a private server) is created and dropped like the default.
    database_url = settings.get("GRID_DATABASE_URL") or f"postgres://postgres@127.0.0.1:5432/grid_e2e_{suffix}"
    env = dict(os.environ)
    env.update(
        {
            "GRID_DATABASE_URL": database_url,
            "GRID_REDIS_URL": "redis://127.0.0.1:6379/0",
            "GRID_CHANNEL_PREFIX": f"gride2e{suffix}",
            "GRID_STAGING_DIR": str(tmp / "staging"),
            "GRID_HEARTBEAT_INTERVAL": "0.5",
            "DJANGO_SETTINGS_MODULE": "gridsite.settings",
            "PYTHONPATH": str(ROOT),
            **settings,
        }
    )
    ensure_database(database_url)
    stack = Stack(env=env, log_dir=tmp / "logs")
    try:
        stack.manage("migrate", "--no-input")
        token = stack.manage("createtoken", "owner", "--create-user", "--staff")
        node_tokens = {f"node-{i}": stack.manage("createnode", f"node-{i}") for i in range(1, agents + 1)}
        urls = [stack.start_gateway()]
        urls += [stack.start_gateway(name=f"gateway{i}", port=free_port()) for i in range(2, gateways + 1)]
        stack.start_worker()
        network = Network(stack, token, node_tokens, tmp / "nodes", database_url, urls if gateways > 1 else [])
        for name in node_tokens:
            if prepare_node is not None:
                prepare_node(name, network.data_root / name)
            network.start_agent(name, **(agent_env or {}))
        network.wait_online(agents)
    except BaseException:
        stack.stop()
        drop_database(database_url)
        raise
    return network


def stop_network(network: Network) -> None:
    network.stack.stop()
    drop_database(network.database_url)
