"""The Grid stack a benchmark runs against: started fresh, or attached to a running one.

``start_grid`` starts a gateway, Celery worker and beat, and agents on a new
PostgreSQL database, all on 127.0.0.1 (gridsite.stack.Stack does the process
work). ``attach_grid`` reads a stack file written by ``save_stack_file``, so
that the smoke test can start one stack and run every script against it.
An attached script stops only the processes it started itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import PYTHON, REPO

from gridsite.stack import Stack, drop_database, ensure_database

logger = logging.getLogger(__name__)

# Settings of every benchmark stack. The REST and inference rate limits are
# off, because a benchmark sends far more than one user's share, and logs
# below WARNING are dropped so that writing them costs nothing.
STACK_SETTINGS = {
    "GRID_HEARTBEAT_INTERVAL": "2.0",
    "GRID_THROTTLE_RATE": "0",
    "GRID_INFER_THROTTLE_RATE": "0",
    "GRID_LOG_LEVEL": "WARNING",
}

# Enrolls nodes in one Django process, far faster than one manage.py process
# per node, and with BENCH_OWNER=1 also creates the owner's API token.
# Prints one line of JSON.
ENROLL_SCRIPT = """
import json, os
from django.contrib.auth import get_user_model
from apps.accounts.models import ApiToken
from apps.accounts.tokens import hash_token, new_token
from apps.registry.models import Node

token = None
if os.environ.get("BENCH_OWNER") == "1":
    user = get_user_model().objects.create_user("bench-owner", is_staff=True)
    _, token = ApiToken.issue(user=user, name="bench")
names = json.loads(os.environ["BENCH_NODE_NAMES"])
plains = [new_token("node") for _ in names]
Node.objects.bulk_create(
    [Node(name=name, token_hash=hash_token(plain)) for name, plain in zip(names, plains)],
    batch_size=1000,
)
print(json.dumps({"token": token, "nodes": dict(zip(names, plains))}))
"""


@dataclass
class GridStack:
    """A running Grid stack, and what a client needs to use it."""

    stack: Stack
    token: str
    node_tokens: dict[str, str]
    database_url: str
    work_dir: Path
    agents: list[str] = field(default_factory=list)
    # Processes of a stack this script attached to, by name. The ones it
    # starts itself are in stack.processes.
    attached_pids: dict[str, int] = field(default_factory=dict)

    @property
    def attached(self) -> bool:
        return bool(self.attached_pids)

    @property
    def url(self) -> str:
        return self.stack.url

    @property
    def port(self) -> int:
        return self.stack.port

    def pid(self, name: str) -> int:
        process = self.stack.processes.get(name)
        return process.pid if process is not None else self.attached_pids[name]

    def client(self, **options: Any):
        import gridclient as gr

        return gr.GridNetwork(self.url, token=self.token, **options)

    def start_agent(self, name: str, **env: str) -> None:
        self.stack.start_agent(
            name, self.node_tokens[name], self.work_dir / "nodes" / name, extra_env=env
        )

    def kill(self, name: str, sig: int) -> None:
        """Send ``sig`` to a process's group; after SIGKILL, wait until it is gone."""
        pid = self.pid(name)
        os.killpg(pid, sig)
        if sig != signal.SIGKILL:
            return
        process = self.stack.processes.get(name)
        if process is not None:
            process.wait(timeout=10)
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.02)

    def enroll(self, names: Sequence[str], *, owner: bool = False) -> dict[str, Any]:
        """Create nodes ``names`` (and the owner's token) in one Django process."""
        result = subprocess.run(
            [str(PYTHON), str(REPO / "manage.py"), "shell", "-c", ENROLL_SCRIPT],
            env={
                **self.stack.env,
                "BENCH_NODE_NAMES": json.dumps(list(names)),
                "BENCH_OWNER": "1" if owner else "0",
            },
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"enrolling nodes with manage.py shell failed:\n{result.stderr[-3000:]}"
            )
        enrolled = json.loads(result.stdout.strip().splitlines()[-1])
        self.node_tokens.update(enrolled["nodes"])
        return enrolled

    def node_statuses(self) -> dict[str, str]:
        """Return node name -> status, read from PostgreSQL."""
        import psycopg

        with psycopg.connect(self.database_url, autocommit=True) as conn:
            return dict(
                conn.execute("SELECT name, status FROM registry_node").fetchall()
            )

    def wait_online(self, names: Sequence[str], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            statuses = self.node_statuses()
            if all(statuses.get(name) == "online" for name in names):
                return
            for name in names:
                process = self.stack.processes.get(name)
                if process is not None and process.poll() is not None:
                    raise RuntimeError(
                        f"agent {name} exited with code {process.returncode}; "
                        f"see {self.stack.log_dir / (name + '.log')}"
                    )
            time.sleep(0.2)
        raise RuntimeError(
            f"agents {list(names)} were not all online within {timeout} s; logs in {self.stack.log_dir}"
        )

    def database_stats(self) -> dict[str, int]:
        """Return this database's pg_stat_database counters of writes."""
        import psycopg

        name = self.database_url.rsplit("/", 1)[1]
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted "
                "FROM pg_stat_database WHERE datname = %s",
                (name,),
            ).fetchone()
        return dict(
            zip(("xact_commit", "tup_inserted", "tup_updated", "tup_deleted"), row)
        )


def _alive(pid: int) -> bool:
    """Return False once ``pid`` has exited (a zombie counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in {"Z", "X"}


def start_grid(
    work_dir: Path,
    *,
    agents: int,
    worker: bool = True,
    settings: dict[str, str] | None = None,
) -> GridStack:
    """Start a gateway, optionally Celery, and ``agents`` agents (node-1...) on a new database.

    The caller must call ``stop_grid``; on an error here everything started
    is stopped first.
    """
    suffix = uuid.uuid4().hex[:10]
    database_url = f"postgres://postgres@127.0.0.1:5432/grid_bench_{suffix}"
    env = dict(os.environ)
    env.update(
        {
            "GRID_DATABASE_URL": database_url,
            "GRID_REDIS_URL": "redis://127.0.0.1:6379/0",
            "GRID_CHANNEL_PREFIX": f"gridbench{suffix}",
            "GRID_STAGING_DIR": str(work_dir / "staging"),
            "DJANGO_SETTINGS_MODULE": "gridsite.settings",
            "PYTHONPATH": str(REPO),
            **STACK_SETTINGS,
            **(settings or {}),
        }
    )
    ensure_database(database_url)
    stack = Stack(env=env, log_dir=work_dir / "logs")
    grid = GridStack(stack, "", {}, database_url, work_dir)
    try:
        stack.manage("migrate", "--no-input")
        names = [f"node-{index}" for index in range(1, agents + 1)]
        grid.token = grid.enroll(names, owner=True)["token"]
        stack.start_gateway()
        if worker:
            stack.start_worker()
        for name in names:
            grid.start_agent(name)
            grid.agents.append(name)
        grid.wait_online(grid.agents)
    except BaseException:
        stop_grid(grid)
        raise
    logger.info(
        "stack up at %s with %d agents; logs in %s", stack.url, agents, stack.log_dir
    )
    return grid


def stop_grid(grid: GridStack) -> None:
    """Stop the processes this script started; for its own stack, drop its database and keys too."""
    try:
        grid.stack.stop()
    finally:
        if not grid.attached:
            drop_database(grid.database_url)
            _drop_redis_keys(grid.stack.env["GRID_CHANNEL_PREFIX"])


def _drop_redis_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    except redis.RedisError as exc:
        logger.warning("could not delete the Redis keys under %s: %s", prefix, exc)
    finally:
        client.close()


def save_stack_file(grid: GridStack, path: Path) -> None:
    """Describe a running stack for ``attach_grid``."""
    pids = {name: process.pid for name, process in grid.stack.processes.items()}
    description = {
        "port": grid.port,
        "token": grid.token,
        "node_tokens": grid.node_tokens,
        "database_url": grid.database_url,
        "agents": grid.agents,
        "env": grid.stack.env,
        "pids": pids,
    }
    path.write_text(json.dumps(description))


def attach_grid(path: Path, work_dir: Path) -> GridStack:
    description = json.loads(path.read_text())
    stack = Stack(
        env=description["env"], log_dir=work_dir / "logs", port=description["port"]
    )
    return GridStack(
        stack,
        description["token"],
        description["node_tokens"],
        description["database_url"],
        work_dir,
        agents=description["agents"],
        attached_pids=description["pids"],
    )


@contextmanager
def open_grid(
    args: argparse.Namespace,
    work_dir: Path,
    *,
    agents: int,
    settings: dict[str, str] | None = None,
) -> Iterator[GridStack]:
    """Yield the stack of ``--attach``, or a new one with ``agents`` agents; stop what was started."""
    if args.attach is not None:
        grid = attach_grid(args.attach, work_dir)
    else:
        grid = start_grid(work_dir, agents=agents, settings=settings)
    try:
        yield grid
    finally:
        stop_grid(grid)


def serve(
    grid: GridStack,
    archive: bytes,
    signature: list[dict[str, Any]],
    model_id: str,
    *,
    replicas: int | None = None,
) -> None:
    """Serve ``archive`` for remote inference on ``replicas`` agents (default: all) and wait until ready."""
    replicas = replicas or len(grid.agents)
    with grid.client() as gateway:
        gateway.serve_model(
            archive,
            model_id,
            allow_remote_inference=True,
            replicas=replicas,
            input_signature=signature,
            wait=False,
            progress=False,
        )
    wait_placed(grid, model_id, replicas)


def placement_counts(grid: GridStack, model_id: str) -> tuple[int, int]:
    """Return (ready placements, failed placements) of ``model_id``, from PostgreSQL."""
    import psycopg

    with psycopg.connect(grid.database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT p.status, count(*) FROM inference_placement p "
            "JOIN inference_model m ON m.id = p.model_id WHERE m.model_id = %s GROUP BY p.status",
            (model_id,),
        ).fetchall()
    counts = dict(rows)
    return counts.get("ready", 0), counts.get("failed", 0)


def wait_placed(
    grid: GridStack, model_id: str, replicas: int, timeout: float = 600.0
) -> None:
    """Poll PostgreSQL every 100 ms until ``replicas`` placements of ``model_id`` are ready.

    Raises RuntimeError when a placement failed or on timeout. gridclient's
    own wait polls at growing intervals, which would add up to seconds here.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, failed = placement_counts(grid, model_id)
        if failed:
            raise RuntimeError(
                f"placement of {model_id} failed on {failed} nodes; logs in {grid.stack.log_dir}"
            )
        if ready >= replicas:
            return
        time.sleep(0.1)
    raise RuntimeError(
        f"{model_id} was not ready on {replicas} replicas within {timeout} s"
    )


# Adds finished jobs of one model, spread over the nodes, in one Django
# process. Prints the number of jobs in the table afterwards.
SEED_JOBS_SCRIPT = """
import os, uuid
from django.db import connection
from django.utils import timezone
from apps.inference.models import InferenceJob, Model
from apps.registry.models import Node

model = Model.objects.get(model_id=os.environ["BENCH_MODEL_ID"])
nodes = list(Node.objects.values_list("pk", flat=True))
missing = int(os.environ["BENCH_JOBS"]) - InferenceJob.objects.count()
now = timezone.now()
InferenceJob.objects.bulk_create(
    [
        InferenceJob(id=uuid.uuid4(), model=model, sha256=model.sha256, status="succeeded",
                     node_id=nodes[index % len(nodes)], attempts=1, input_bytes=1,
                     deadline=now, finished=now)
        for index in range(max(0, missing))
    ],
    batch_size=5000,
)
with connection.cursor() as cursor:
    cursor.execute("ANALYZE inference_inferencejob")
print(InferenceJob.objects.count())
"""


def seed_jobs(grid: GridStack, model_id: str, total: int) -> int:
    """Add finished jobs of ``model_id`` until the job table has ``total``; return its count.

    Stands in for the history of a gateway that has served that many requests.
    """
    result = subprocess.run(
        [str(PYTHON), str(REPO / "manage.py"), "shell", "-c", SEED_JOBS_SCRIPT],
        env={**grid.stack.env, "BENCH_MODEL_ID": model_id, "BENCH_JOBS": str(total)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"seeding jobs with manage.py shell failed:\n{result.stderr[-3000:]}"
        )
    return int(result.stdout.strip().splitlines()[-1])
