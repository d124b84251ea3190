"""Measure what K connected agents cost one gateway process: CPU, memory, writes, lag.

Starts a Grid stack with no real agents and enrolls the largest K as nodes
in one ``manage.py shell -c`` script. For each K, a bench/fake_agents.py
process opens K agent websockets (hello, welcome, then a heartbeat every
2 s, the default interval). Once all are connected and a few intervals have
passed, the script reads over --window seconds:

- the gateway process's CPU (in cores) and RSS, and the Celery worker's CPU
  (its periodic sweep copies heartbeats from Redis to PostgreSQL), from /proc;
- PostgreSQL writes per second for the database (pg_stat_database deltas of
  xact_commit and tup_updated);
- heartbeat lag p99 from the gateway's grid_heartbeat_lag_seconds histogram
  at /metrics (sent_at on the agent to receipt on the gateway), as the upper
  bound of the bucket that contains the 99th percentile;
- the simulated agents' own CPU.

The open-files limit is raised with setrlimit, and the gateway inherits it.
When not all K agents connect, the table shows how many did.

    .venv/bin/python bench/bench_heartbeat.py
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from common import read_process
from gridstack import GridStack, open_grid

logger = logging.getLogger(__name__)

NAME = "heartbeat"
COUNTS = [100, 1000, 5000]
SMOKE_COUNTS = [10]
TARGET_AGENTS = 5000
TARGET_CORES = 1.0
LAG_METRIC = "grid_heartbeat_lag_seconds"


def scrape_lag(grid: GridStack) -> dict[float, float]:
    """Return the lag histogram's cumulative bucket counts, keyed by upper bound (inf included)."""
    import httpx

    text = httpx.get(f"{grid.url}/metrics", timeout=30).text
    buckets = {}
    for line in text.splitlines():
        if line.startswith(f"{LAG_METRIC}_bucket"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[math.inf if bound == "+Inf" else float(bound)] = float(
                line.rsplit(" ", 1)[1]
            )
    return buckets


def lag_percentile(
    before: dict[float, float], after: dict[float, float], fraction: float
) -> tuple[float, int]:
    """Return (bucket bound holding the percentile, observations) between two scrapes."""
    bounds = sorted(after)
    deltas = [after[bound] - before.get(bound, 0.0) for bound in bounds]
    total = deltas[-1] if deltas else 0
    if total <= 0:
        return math.nan, 0
    for bound, cumulative in zip(bounds, deltas):
        if cumulative >= fraction * total:
            return bound, int(total)
    return math.inf, int(total)


def read_status(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def online_count(grid: GridStack, names: list[str]) -> int:
    statuses = grid.node_statuses()
    return sum(1 for name in names if statuses.get(name) == "online")


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def count_log_lines(path: Path, start: int, end: int | None = None) -> dict[str, int]:
    """Count the gateway's log lines between two offsets that show lost agents and errors."""
    if not path.exists():
        return {}
    with path.open("rb") as file:
        file.seek(start)
        text = file.read(None if end is None else end - start).decode(errors="replace")
    return {
        "asgi_errors": text.count("Exception in ASGI application"),
        "redis_pool_full": text.count("redis.exceptions.MaxConnectionsError: "),
        "heartbeat_timeouts": text.count("no heartbeat for"),
    }


def simulated_names(count: int) -> list[str]:
    return [f"simulated-{index}" for index in range(1, count + 1)]


def measure_count(
    args: argparse.Namespace, grid: GridStack, work_dir: Path, count: int
) -> dict[str, Any]:
    names = simulated_names(count)
    tokens = [(name, grid.node_tokens[name]) for name in names]
    tokens_file = work_dir / f"tokens-{count}.json"
    tokens_file.write_text(json.dumps(tokens))
    status_file = work_dir / f"fleet-{count}.json"
    ws_url = grid.url.replace("http://", "ws://") + "/ws/agent/"
    gateway_pid, worker_pid = grid.pid("gateway"), grid.pid("worker")
    interval = float(grid.stack.env["GRID_HEARTBEAT_INTERVAL"])

    gateway_log = grid.stack.log_dir / "gateway.log"
    log_start = log_size(gateway_log)
    gateway_start = read_process(gateway_pid)
    fleet = subprocess.Popen(
        [
            str(common.PYTHON),
            str(common.REPO / "bench" / "fake_agents.py"),
            "--gateway",
            ws_url,
            "--tokens-file",
            str(tokens_file),
            "--status-file",
            str(status_file),
            "--connect-rate",
            str(args.connect_rate),
        ],
        cwd=common.REPO,
    )
    try:
        deadline = time.monotonic() + args.connect_timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = read_status(status_file)
            if status.get("connect_seconds") is not None:
                break
            if fleet.poll() is not None:
                raise RuntimeError(
                    f"fake_agents.py exited with code {fleet.returncode}"
                )
            time.sleep(0.5)
        connected_at = read_process(gateway_pid)
        print(
            f"K={count}: {status.get('connected', 0)} connected, {status.get('failed', 0)} failed "
            f"in {status.get('connect_seconds') or args.connect_timeout:.1f} s",
            flush=True,
        )
        # Let every agent send a few heartbeats and the sweeps settle.
        time.sleep(args.settle)

        first = {
            "gateway": read_process(gateway_pid),
            "worker": read_process(worker_pid),
            "fleet": read_process(fleet.pid),
            "database": grid.database_stats(),
            "lag": scrape_lag(grid),
            "online": online_count(grid, names),
        }
        time.sleep(args.window)
        last = {
            "gateway": read_process(gateway_pid),
            "worker": read_process(worker_pid),
            "fleet": read_process(fleet.pid),
            "database": grid.database_stats(),
            "lag": scrape_lag(grid),
            "online": online_count(grid, names),
        }
        status = read_status(status_file)
        log_window_end = log_size(gateway_log)
    finally:
        if fleet.poll() is None:
            fleet.send_signal(signal.SIGTERM)
        try:
            fleet.wait(timeout=120)
        except subprocess.TimeoutExpired:
            fleet.kill()
            fleet.wait()

    # Let the gateway take the closed nodes offline before the next count.
    deadline = time.monotonic() + 120
    while online_count(grid, names) and time.monotonic() < deadline:
        time.sleep(0.5)

    seconds = last["gateway"].at - first["gateway"].at
    lag, observed = lag_percentile(first["lag"], last["lag"], 0.99)
    database = {
        name: (last["database"][name] - first["database"][name]) / seconds
        for name in first["database"]
    }
    return {
        "agents": count,
        "connected": status.get("connected", 0),
        "welcomed": status.get("welcomed", 0),
        "dropped": status.get("dropped", 0),
        "gateway_log": count_log_lines(gateway_log, log_start, log_window_end),
        "gateway_log_closing": count_log_lines(gateway_log, log_window_end),
        "failed": status.get("failed", 0),
        "errors": status.get("errors", []),
        "connect_seconds": status.get("connect_seconds"),
        "connect_gateway_cpu": connected_at.cpu_seconds - gateway_start.cpu_seconds,
        "online": min(first["online"], last["online"]),
        "gateway_cores": common.cpu_share(first["gateway"], last["gateway"]),
        "gateway_rss": last["gateway"].rss_bytes,
        "worker_cores": common.cpu_share(first["worker"], last["worker"]),
        "fleet_cores": common.cpu_share(first["fleet"], last["fleet"]),
        "commits_per_second": database["xact_commit"],
        "updates_per_second": database["tup_updated"],
        "inserts_per_second": database["tup_inserted"],
        "lag_p99_bound": lag,
        "heartbeats_observed": observed,
        "heartbeats_expected": count * seconds / interval,
    }


def run(args: argparse.Namespace, work_dir: Path) -> tuple[list[dict[str, Any]], int]:
    counts = (
        SMOKE_COUNTS if args.smoke else [int(value) for value in args.counts.split(",")]
    )
    # Each agent takes one descriptor in the gateway and one in fake_agents.py;
    # PostgreSQL and Redis connections and log files need some more.
    limit = common.raise_open_files_limit(2 * max(counts) + 1024)
    rows = []
    with open_grid(args, work_dir, agents=0) as grid:
        grid.enroll(simulated_names(max(counts)))
        for count in counts:
            rows.append(measure_count(args, grid, work_dir, count))
            row = rows[-1]
            print(
                f"K={count}: gateway {row['gateway_cores']:.2f} cores, RSS {row['gateway_rss'] / 2**20:.0f} MiB, "
                f"{row['commits_per_second']:.1f} commits/s, {row['updates_per_second']:.0f} rows updated/s, "
                f"lag p99 <= {row['lag_p99_bound'] * 1000:.0f} ms",
                flush=True,
            )
    return rows, limit


def render(
    args: argparse.Namespace, rows: list[dict[str, Any]], limit: int, header: list[str]
) -> str:
    lines = [
        "# Heartbeat scale: simulated agents on one gateway process",
        "",
        *header,
        f"- {common.software_versions('Django', 'channels', 'channels-redis', 'uvicorn', 'websockets')}.",
        "- Stack: one gateway process (uvicorn, websockets), Celery worker and beat, PostgreSQL "
        "and Redis. Simulated agents: bench/fake_agents.py, one asyncio process with one "
        "websocket per agent, hello without models, then a heartbeat every 2 s.",
        f"- Open-files limit (RLIMIT_NOFILE, soft) of the script and the gateway: {limit}.",
        f"- Each K: the agents connect at up to {args.connect_rate:g} handshakes per second, 50 at "
        f"a time at most, then {args.settle:g} s to settle, then "
        f"a {args.window:g} s window. CPU in cores (1.00 = one core busy). Database writes are "
        "pg_stat_database deltas for this database over the window (PostgreSQL flushes them "
        "with a delay of up to a few seconds, so short windows are approximate). Lag p99 is the "
        "upper bound of the histogram bucket that holds it (buckets 5, 10, 25, 50, 100 ms...).",
        "- Welcomed: agents that got `welcome`. Dropped later: welcomed agents whose socket the "
        "gateway closed before the end, for instance after a heartbeat that it processed too "
        "late (close code 4408) or an error in the consumer. The gateway's log lines over each K "
        "are counted below the table.",
        f"- Target: {TARGET_AGENTS:,} agents on one gateway process using less than "
        f"{TARGET_CORES:g} core.",
        "",
    ]
    headers = [
        "agents",
        "welcomed",
        "dropped later",
        "connected at the end",
        "online in PostgreSQL",
        "connect time, s",
        "gateway CPU while connecting, s",
        "gateway CPU, cores",
        "gateway RSS, MiB",
        "worker CPU, cores",
        "commits/s",
        "rows updated/s",
        "heartbeats in window (expected)",
        "lag p99, ms",
        "simulated agents' CPU, cores",
    ]
    table = []
    for row in rows:
        lag = row["lag_p99_bound"]
        table.append(
            [
                f"{row['agents']:,}",
                f"{row['welcomed']:,}",
                f"{row['dropped']:,}",
                f"{row['connected']:,}",
                f"{row['online']:,}",
                f"{row['connect_seconds']:.1f}"
                if row["connect_seconds"] is not None
                else "timed out",
                f"{row['connect_gateway_cpu']:.1f}",
                f"{row['gateway_cores']:.2f}",
                f"{row['gateway_rss'] / 2**20:.0f}",
                f"{row['worker_cores']:.2f}",
                f"{row['commits_per_second']:.1f}",
                f"{row['updates_per_second']:.0f}",
                f"{row['heartbeats_observed']:,} ({row['heartbeats_expected']:,.0f})",
                "n/a"
                if math.isnan(lag)
                else ("> 10,000" if math.isinf(lag) else f"<= {lag * 1000:.0f}"),
                f"{row['fleet_cores']:.2f}",
            ]
        )
    lines += common.markdown_table(headers, table)
    lines.append("")
    for row in rows:
        logged = row.get("gateway_log") or {}
        closing = row.get("gateway_log_closing") or {}
        if logged:
            lines.append(
                f"- Gateway log, K={row['agents']:,}, from the first handshake to the end of the "
                f"window: {logged['heartbeat_timeouts']:,} nodes closed for missed heartbeats, "
                f"{logged['asgi_errors']:,} consumers ended by an exception, "
                f"{logged['redis_pool_full']:,} errors logged as redis-py's MaxConnectionsError. "
                f"While all {row['agents']:,} agents closed their sockets at once: "
                f"{closing.get('asgi_errors', 0):,} consumers ended by an exception, "
                f"{closing.get('redis_pool_full', 0):,} MaxConnectionsError. The "
                "asyncio Redis client's pool holds at most 100 connections by default (redis-py "
                "8.2) and raises when they are all in use."
            )
    lines += [
        "",
        *verdict(rows),
        "",
        f"![Gateway CPU and RSS by agent count](../../docs/benchmarks/{NAME}.png)",
        "",
    ]
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    full = [row for row in rows if row["agents"] >= TARGET_AGENTS]
    if not full:
        return [f"- Target: not measured (no run with {TARGET_AGENTS:,} agents)."]
    row = full[-1]
    fitted = row["connected"] >= TARGET_AGENTS
    met = fitted and row["gateway_cores"] < TARGET_CORES
    lines = [
        f"- Target, {TARGET_AGENTS:,} agents under {TARGET_CORES:g} core: {row['connected']:,} connected, "
        f"gateway at {row['gateway_cores']:.2f} cores: {'met' if met else 'MISSED'}."
    ]
    if row["connected"] < TARGET_AGENTS:
        logged = row.get("gateway_log") or {}
        lines.append(
            f"  - What holds it back: {row['welcomed']:,} agents were welcomed and "
            f"{row['dropped']:,} of them dropped later; the gateway log shows "
            f"{logged.get('heartbeat_timeouts', 0):,} closes for missed heartbeats and "
            f"{logged.get('redis_pool_full', 0):,} redis-py MaxConnectionsError. A consumer "
            "handles its messages one at a time, so a heartbeat waits while the consumer is "
            "still in its hello, whose PostgreSQL calls all go through the one thread of "
            "database_sync_to_async; its silence then counts toward the timeout. Each "
            "heartbeat is also its own Redis round trip, and with more than 100 in flight the "
            "asyncio client's default pool raises instead of waiting."
        )
    if row["gateway_cores"] >= TARGET_CORES:
        lines.append(
            "  - What holds it back: each heartbeat costs the gateway a websocket frame, a JSON "
            "parse, a Redis HSET round trip and a histogram update, and each connection "
            "wakes every half interval to check for silence."
        )
    return lines


def plot(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    figure_axes = common.new_figure(
        "One gateway process with K simulated agents",
        "agents (K)",
        "gateway CPU, cores",
    )
    if figure_axes is None or not rows:
        return
    figure, axes = figure_axes
    axes.set_xscale("log")
    counts = [row["agents"] for row in rows]
    axes.plot(
        counts,
        [row["gateway_cores"] for row in rows],
        "o-",
        color="tab:blue",
        label="gateway CPU, cores",
    )
    axes.axhline(TARGET_CORES, color="tab:blue", linestyle=":", linewidth=1)
    axes.set_ylim(bottom=0)
    # CPU and memory are for the agents that stayed connected, which may be fewer than K.
    for row in rows:
        axes.annotate(
            f"{row['connected']:,} of {row['agents']:,} connected",
            (row["agents"], row["gateway_cores"]),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=8,
        )
    memory = axes.twinx()
    memory.plot(
        counts,
        [row["gateway_rss"] / 2**20 for row in rows],
        "s--",
        color="tab:green",
        label="gateway RSS, MiB",
    )
    memory.set_ylabel("RSS, MiB")
    memory.set_ylim(bottom=0)
    figure.legend(loc="upper left", bbox_to_anchor=(0.1, 0.88))
    common.save_figure(args, figure, NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_arguments(parser)
    parser.add_argument(
        "--counts",
        default=",".join(map(str, COUNTS)),
        help="comma-separated agent counts (default: 100,1000,5000; smoke: 10)",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=None,
        help="seconds of measurement per count (default: 20; smoke: 1)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        help="seconds between connecting and measuring (default: 6; smoke: 1)",
    )
    parser.add_argument(
        "--connect-rate",
        type=float,
        default=100.0,
        help="agent handshakes started per second at most (default: 100)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for all agents to connect (default: 300)",
    )
    args = parser.parse_args()
    common.configure()
    args.window = args.window or (1.0 if args.smoke else 20.0)
    args.settle = args.settle or (1.0 if args.smoke else 6.0)

    started = common.now()
    load_before = common.load_average()
    with tempfile.TemporaryDirectory(prefix="grid-bench-heartbeat-") as tmp:
        rows, limit = run(args, args.work_dir or Path(tmp))
    header = common.header_lines(
        args, "bench_heartbeat.py", (load_before, common.load_average()), started
    )
    markdown = render(args, rows, limit, header)
    print(markdown)
    common.write_result(args, NAME, markdown, {"rows": rows, "open_files_limit": limit})
    plot(args, rows)


if __name__ == "__main__":
    main()
