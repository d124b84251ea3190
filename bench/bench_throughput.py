"""Measure Grid's throughput and p99 latency against the number of concurrent clients.

Starts a Grid stack with --agents agents (3 by default) and serves the demo's
DigitsCNN (demo/digits.py, random weights) on every agent. Closed-loop
clients (bench/httpload.py, in their own process) each send one image per
request and send the next as soon as the response arrives. Each concurrency
level runs for --seconds in each of --rounds rounds; the levels go up in one
round and down in the next, so a change in the machine's load falls on all
levels alike. Beside each figure: the CPU of the client, the gateway process
and the agents, from /proc and getrusage.

The limit column is the same model called in-process on one image at a
time with one torch thread, the work the agents would do with no gateway at
all, measured between the blocks of each round.

    .venv/bin/python bench/bench_throughput.py
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import load
from common import median, percentile
from gridstack import GridStack, open_grid, seed_jobs, serve

logger = logging.getLogger(__name__)

NAME = "throughput"
MODEL_ID = "throughput-digits"
LEVELS = [1, 2, 4, 8, 16, 32, 64]
SMOKE_LEVELS = [4]
# Job table sizes for the history runs, and the clients they run with.
HISTORY = [10_000, 100_000]
HISTORY_CLIENTS = 16


def serve_digits(grid: GridStack, replicas: int) -> Any:
    """Serve DigitsCNN on ``replicas`` agents and return the module for in-process calls."""
    import models

    archive, signature = models.cached("digits", models.export_digits)
    serve(grid, archive, signature, MODEL_ID, replicas=replicas)
    return models.load_program(archive, grid.work_dir / "digits.pt2")


def in_process_rate(module: Any, seconds: float) -> float:
    """Return calls per second of ``module`` on one image, one torch thread."""
    import torch

    image = torch.rand(1, 1, 8, 8)
    calls = 0
    stop_at = time.perf_counter() + seconds
    with torch.inference_mode():
        while time.perf_counter() < stop_at:
            module(image)
            calls += 1
    return calls / seconds


def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    levels = (
        SMOKE_LEVELS if args.smoke else [int(value) for value in args.levels.split(",")]
    )
    with open_grid(args, work_dir, agents=args.agents) as grid:
        args.agents = len(grid.agents)
        module = serve_digits(grid, args.agents)
        bodies = load.write_bodies(work_dir, "digit", load.digit_bodies(64))
        target = load.grid_target(grid, MODEL_ID)
        pids = {
            "gateway": [grid.pid("gateway")],
            "agents": [grid.pid(n) for n in grid.agents],
        }
        if not args.smoke:
            load.run_load(target, bodies, clients=8, seconds=1.0, work_dir=work_dir)

        blocks: dict[int, list[dict[str, Any]]] = {level: [] for level in levels}
        limits = []
        for round_index in range(args.rounds):
            order = levels if round_index % 2 == 0 else list(reversed(levels))
            for clients in order:
                block = load.measure_block(
                    target,
                    bodies,
                    clients=clients,
                    seconds=args.seconds,
                    work_dir=work_dir,
                    pids=pids,
                )
                blocks[clients].append(block)
                print(
                    f"round {round_index + 1}, {common.plural(clients, 'client')}: {block['rate']:.0f} req/s, "
                    f"p99 {block['p99']:.1f} ms, failed {block['failed']}, "
                    f"client {block['client_cores']:.2f} cores, gateway {block['gateway_cores']:.2f} cores",
                    flush=True,
                )
            limits.append(in_process_rate(module, 0.2 if args.smoke else 2.0))
        history = measure_history(args, grid, target, bodies, pids, work_dir)
    return {"blocks": blocks, "limits": limits, "history": history}


def measure_history(
    args: argparse.Namespace,
    grid: GridStack,
    target: load.Target,
    bodies: list[Path],
    pids: dict[str, list[int]],
    work_dir: Path,
) -> list[dict[str, Any]]:
    """Measure HISTORY_CLIENTS clients after seeding the job table to each --history size."""
    counts = (
        [] if args.smoke else [int(value) for value in args.history.split(",") if value]
    )
    blocks = []
    for count in counts:
        jobs = seed_jobs(grid, MODEL_ID, count)
        block = load.measure_block(
            target,
            bodies,
            clients=HISTORY_CLIENTS,
            seconds=args.seconds,
            work_dir=work_dir,
            pids=pids,
        )
        del block["latencies"]
        block["jobs"] = jobs
        blocks.append(block)
        print(
            f"{jobs:,} jobs in the table, {HISTORY_CLIENTS} clients: {block['rate']:.0f} req/s, "
            f"p99 {block['p99']:.1f} ms, gateway {block['gateway_cores']:.2f} cores",
            flush=True,
        )
    return blocks


def summarize(blocks: dict[int, list[dict[str, Any]]]) -> dict[int, dict[str, Any]]:
    """Return one row per level: median rate, pooled percentiles, mean CPU."""
    rows = {}
    for clients, runs in blocks.items():
        latencies = [value for block in runs for value in block["latencies"]]
        rows[clients] = {
            "rate": median([block["rate"] for block in runs]),
            "rates": [block["rate"] for block in runs],
            "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99),
            "failed": sum(block["failed"] for block in runs),
            "client_cores": median([block["client_cores"] for block in runs]),
            "gateway_cores": median([block["gateway_cores"] for block in runs]),
            "agents_cores": median([block["agents_cores"] for block in runs]),
            "gateway_cpu_ms": median([block["gateway_cpu_ms"] for block in runs]),
        }
    return rows


def render(args: argparse.Namespace, data: dict[str, Any], header: list[str]) -> str:
    rows = summarize(data["blocks"])
    limit = median(data["limits"])
    lines = [
        "# Throughput against concurrency",
        "",
        *header,
        f"- {common.software_versions('torch', 'Django', 'channels', 'uvicorn', 'uvloop')}.",
        f"- Stack: one gateway process, Celery worker and beat, {common.plural(args.agents, 'agent')} "
        "(default settings: 1 torch thread, concurrency 2, 1 ms batch window); model "
        f"demo/digits.py DigitsCNN on {common.plural(args.agents, 'replica')}, one 1x1x8x8 image per request.",
        f"- Each level: {args.rounds} rounds of {args.seconds:g} s, levels up in one round and "
        "down in the next. Rate is the median over rounds; p50 and p99 pool every request of "
        "the level. CPU is in cores (1.00 = one core busy): the load generator's own "
        "(getrusage), the gateway process's and the agents' together (/proc).",
        "- Every request adds a row to the job table and the history slows each request "
        "(see the table after this one), so later blocks run with more history than earlier "
        "ones; the order of levels alternates between rounds to spread that.",
        f"- Limit: the same model in-process, one image per call, one torch thread: "
        f"{limit:,.0f} calls/s on one core (median of {len(data['limits'])} measurements in "
        "this run). The agents share 2 cores with the gateway, PostgreSQL, Redis, the client "
        "and other users, so no stack reaches twice this figure here.",
        "",
    ]
    headers = [
        "clients",
        "req/s",
        "each round",
        "share of the limit",
        "p50, ms",
        "p99, ms",
        "failed",
        "client CPU, cores",
        "gateway CPU, cores",
        "agents CPU, cores",
        "gateway CPU per request, ms",
    ]
    table = [
        [
            clients,
            f"{row['rate']:,.0f}",
            ", ".join(f"{rate:.0f}" for rate in row["rates"]),
            f"{100 * row['rate'] / limit:.1f} %",
            f"{row['p50']:.1f}",
            f"{row['p99']:.1f}",
            row["failed"],
            f"{row['client_cores']:.2f}",
            f"{row['gateway_cores']:.2f}",
            f"{row['agents_cores']:.2f}",
            f"{row['gateway_cpu_ms']:.2f}",
        ]
        for clients, row in rows.items()
    ]
    lines += common.markdown_table(headers, table)
    best = max(rows.values(), key=lambda row: row["rate"])
    best_clients, best = max(rows.items(), key=lambda item: item[1]["rate"])
    lines += [
        "",
        f"- Peak: {best['rate']:,.0f} req/s at {best_clients} clients, {100 * best['rate'] / limit:.1f} % "
        f"of the in-process limit. There the gateway process used {best['gateway_cores']:.2f} "
        f"cores, {best['gateway_cpu_ms']:.2f} ms of CPU per request, against "
        f"{best['agents_cores']:.2f} cores for all agents together: the gateway bounds "
        "throughput here, not the model.",
    ]
    lines += render_history(data.get("history", []), rows)
    lines += [
        "",
        f"![Throughput and p99 against concurrency](../../docs/benchmarks/{NAME}.png)",
        "",
    ]
    return "\n".join(lines)


def render_history(
    history: list[dict[str, Any]], rows: dict[int, dict[str, Any]]
) -> list[str]:
    """Render the runs after seeding the job table, which stand in for a gateway's history."""
    if not history:
        return []
    lines = [
        "",
        f"## Throughput at {HISTORY_CLIENTS} clients against the job history",
        "",
        "The same stack after adding finished jobs to its table, as a gateway that has "
        "served that many requests would have (one block each, after the sweep above). "
        "Every request runs a query that picks the least busy replica.",
        "",
    ]
    headers = [
        "jobs in the table",
        "req/s",
        "p99, ms",
        "failed",
        "gateway CPU, cores",
        "gateway CPU per request, ms",
    ]
    table = []
    sweep = rows.get(HISTORY_CLIENTS)
    if sweep is not None:
        table.append(
            [
                "the sweep above (fresh)",
                f"{sweep['rate']:,.0f}",
                f"{sweep['p99']:.1f}",
                sweep["failed"],
                f"{sweep['gateway_cores']:.2f}",
                f"{sweep['gateway_cpu_ms']:.2f}",
            ]
        )
    for block in history:
        table.append(
            [
                f"{block['jobs']:,}",
                f"{block['rate']:,.0f}",
                f"{block['p99']:.1f}",
                block["failed"],
                f"{block['gateway_cores']:.2f}",
                f"{block['gateway_cpu_ms']:.2f}",
            ]
        )
    lines += common.markdown_table(headers, table)
    lines += [
        "",
        "- What holds it back: the query that picks a replica (choose_node in "
        "apps/inference/services/dispatch.py) counts running jobs with "
        '`Count("node__jobs", filter=Q(node__jobs__status=RUNNING))`, so PostgreSQL joins '
        "every job each node ever ran and filters afterwards; nothing deletes old jobs. Its "
        "cost grows with the history, on PostgreSQL's CPU, which shares the 2 cores.",
    ]
    return lines


def plot(args: argparse.Namespace, data: dict[str, Any]) -> None:
    rows = summarize(data["blocks"])
    figure_axes = common.new_figure(
        "Grid throughput, demo CNN, 3 agents",
        "concurrent clients",
        "requests/s",
        xlog=True,
    )
    if figure_axes is None:
        return
    figure, axes = figure_axes
    levels = list(rows)
    axes.plot(
        levels,
        [rows[level]["rate"] for level in levels],
        "o-",
        color="tab:blue",
        label="req/s",
    )
    axes.set_ylim(bottom=0)
    latency_axes = axes.twinx()
    latency_axes.plot(
        levels,
        [rows[level]["p99"] for level in levels],
        "s--",
        color="tab:red",
        label="p99, ms",
    )
    latency_axes.set_ylabel("p99 latency, ms")
    latency_axes.set_ylim(bottom=0)
    figure.legend(loc="upper left", bbox_to_anchor=(0.1, 0.88))
    common.save_figure(args, figure, NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_arguments(parser)
    parser.add_argument(
        "--agents",
        type=int,
        default=None,
        help="agents and replicas (default: 3; smoke: 1)",
    )
    parser.add_argument(
        "--levels",
        default=",".join(map(str, LEVELS)),
        help="comma-separated client counts (default: 1,2,4,8,16,32,64; smoke: 4)",
    )
    parser.add_argument(
        "--history",
        default=",".join(map(str, HISTORY)),
        help="comma-separated job table sizes to seed and measure at 16 clients "
        "(default: 10000,100000; smoke: none)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="seconds per block (default: 4; smoke: 0.5)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds over all levels (default: 2; smoke: 1)",
    )
    args = parser.parse_args()
    common.configure()
    args.agents = args.agents or (1 if args.smoke else 3)
    args.seconds = args.seconds or (0.5 if args.smoke else 4.0)
    args.rounds = args.rounds or (1 if args.smoke else 2)

    started = common.now()
    load_before = common.load_average()
    with tempfile.TemporaryDirectory(prefix="grid-bench-throughput-") as tmp:
        data = run(args, args.work_dir or Path(tmp))
    header = common.header_lines(
        args, "bench_throughput.py", (load_before, common.load_average()), started
    )
    markdown = render(args, data, header)
    print(markdown)
    stored = {
        str(level): [
            {k: v for k, v in block.items() if k != "latencies"} for block in runs
        ]
        for level, runs in data["blocks"].items()
    }
    common.write_result(
        args,
        NAME,
        markdown,
        {"blocks": stored, "limits": data["limits"], "history": data["history"]},
    )
    plot(args, data)


if __name__ == "__main__":
    main()
