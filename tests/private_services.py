"""Private Redis and PostgreSQL servers that a test may stop and restart.

The machine's own servers on 6379 and 5432 are shared by every test session,
so fault tests never stop them. These servers listen on free loopback ports,
keep their files in a temporary folder and are stopped by ``stop``.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

from gridsite.stack import free_port

logger = logging.getLogger(__name__)

# Seconds a server may take to accept connections after it starts.
START_TIMEOUT = 30.0


def _wait_until(check, what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not happen within {timeout} s")


@dataclass
class PrivateRedis:
    """A ``redis-server`` without persistence on a free loopback port."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server, on the same port as before, and wait until it replies to PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            shutil.which("redis-server") or "redis-server",
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]
        # No inherited stdout: a server left running must not hold a caller's pipe open.
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        _wait_until(self.is_up, f"Redis on port {self.port} replying to PING")
        logger.info("private Redis started on port %s (pid %s)", self.port, self.process.pid)

    def is_up(self) -> bool:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; its data is gone (no persistence)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None


def _postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    located = shutil.which(name)
    if located is None:
        raise RuntimeError(f"PostgreSQL's {name} was not found under /usr/lib/postgresql/*/bin or on PATH")
    return located


def _as_postgres(command: list[str]) -> list[str]:
    """Run ``command`` as the postgres user when this process is root, as initdb requires."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of its own, with trust authentication, on a free loopback port.

    Its files and its Unix socket go in a new folder under the system's
    temporary directory, owned by the postgres user when this process is
    root: pytest's own folders are private to root, so the server could not
    enter them. ``remove`` stops the server and deletes the folder.
    """

    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="grid-pg-")))
    port: int = field(default_factory=free_port)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        command = [_postgres_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync"]
        _run(_as_postgres(command))

    def start(self) -> None:
        """Start the cluster and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.directory / "postgres.log")
        _run(_as_postgres([_postgres_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start"]))
        _wait_until(self.is_up, f"PostgreSQL on port {self.port} accepting connections")
        logger.info("private PostgreSQL started on port %s", self.port)

    def is_up(self) -> bool:
        try:
            with psycopg.connect(self.url("postgres"), connect_timeout=1) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster; ``immediate`` ends it without a clean shutdown, as a crash would."""
        command = [_postgres_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]
        subprocess.run(_as_postgres(command), check=False, capture_output=True, timeout=120)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{command[-1]} failed with code {result.returncode}: {result.stderr[-2000:]}")
