"""Start and stop a whole Grid stack as local processes: gateway, Celery, agents.

The demo and the end-to-end tests use this. It imports no Django, so it can
prepare a database before Django is configured. Each process writes its output
to its own log file; ``stop`` ends every process it started, also on errors.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_database(url: str) -> None:
    """Create the PostgreSQL database named in ``url`` if it does not exist."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(url: str) -> None:
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def gateway_command(port: int, env: dict[str, str], host: str = "127.0.0.1") -> list[str]:
    """Build the uvicorn command line of one gateway process.

    ``--lifespan on`` lets SIGTERM move agents to other gateway processes
    before this one exits (gridsite.lifespan). The protocol is
    ``websockets-sansio``, not the legacy ``websockets``. After a frame over
    ``--ws-max-size`` whose payload never arrives, uvicorn 0.55's legacy
    implementation closes the socket with 1009 but sends the consumer no
    disconnect event, so the consumer stays alive until the process exits.
    """
    ws_max = env.get("GRID_WS_MAX_BYTES", str(64 * 1024**2))
    return [
        sys.executable, "-m", "uvicorn", "gridsite.asgi:application",
        "--host", host, "--port", str(port),
        "--ws", "websockets-sansio", "--ws-max-size", ws_max,
        "--ws-per-message-deflate", "false",
        "--lifespan", "on", "--no-access-log", "--timeout-graceful-shutdown", "5",
    ]


def celery_commands(schedule: Path) -> dict[str, list[str]]:
    """Build the command lines of the Celery worker and beat, keyed by process name."""
    celery = [sys.executable, "-m", "celery", "-A", "gridsite"]
    return {
        "worker": [*celery, "worker", "--pool", "threads", "--concurrency", "4", "--loglevel", "INFO"],
        "beat": [*celery, "beat", "--loglevel", "INFO", "--schedule", str(schedule)],
    }


@dataclass
class Stack:
    """A set of Grid processes sharing one environment."""

    env: dict[str, str]
    log_dir: Path
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def manage(self, *args: str) -> str:
        """Run a management command and return its standard output."""
        result = subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), *args], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args[:1])} failed:\n{result.stderr[-3000:]}")
        return result.stdout.strip()

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            command, env={**self.env, **(env or {})}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes[name] = process
        return process

    def start_gateway(self, name: str = "gateway", port: int | None = None, env: dict[str, str] | None = None) -> str:
        """Start a gateway process; a second one needs its own ``name`` and ``port``.

        Returns its URL once /healthz returns 200.
        """
        port = self.port if port is None else port
        merged = {**self.env, **(env or {})}
        self.start(name, gateway_command(port, merged), env=env)
        url = f"http://127.0.0.1:{port}"
        self.wait_http(f"{url}/healthz", name)
        return url

    def start_worker(self) -> None:
        for name, command in celery_commands(self.log_dir / "celerybeat-schedule").items():
            self.start(name, command)

    def start_agent(
        self, name: str, token: str, data_dir: Path, extra_env: dict[str, str] | None = None, gateway: str | None = None
    ) -> subprocess.Popen:
        """Start an agent; ``gateway`` is one URL or a comma-separated list (default: this stack's)."""
        env = {"GRID_NODE_TOKEN": token, **(extra_env or {})}
        return self.start(
            name,
            [sys.executable, "-m", "nodeagent", "--gateway", gateway or self.url, "--name", name, "--data-dir", str(data_dir)],
            env=env,
        )

    def wait_http(self, url: str, name: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self.processes.get(name)
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{name} exited with code {process.returncode}; see {self.log_dir / (name + '.log')}")
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not answer {url} within {timeout} s; see {self.log_dir / (name + '.log')}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes[name]
        os.killpg(process.pid, sig)
        if sig == signal.SIGKILL:
            process.wait(timeout=10)

    def stop(self) -> None:
        """Stop every process: SIGTERM, then SIGKILL after 10 s."""
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGCONT)
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        self.processes.clear()
