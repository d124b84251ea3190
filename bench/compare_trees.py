"""Compare gateways built from several source trees in one run, interleaved.

For measuring a change to the gateway's hot path before it lands: copy the
repository, change the copy, and pass both trees. Each tree gets its own
stack (gateway, Celery, --agents agents, its own database) started from that
tree's code. The stacks run side by side, and every measurement alternates
between them, so that the machine's load falls on all of them alike:

- one client sending 64 KB requests to ``x.sum(dim=1, keepdim=True)``, each
  tree in turn (p50, p99 and the gateway's CPU per request);
- 16 closed-loop clients with one demo CNN image per request, one block per
  tree in each round, the order rotated every round.

--seed-jobs first fills each job table with that many finished jobs, as a
gateway that has served that many requests would have. The first tree is
the baseline of the ratios. It is a tool, not one of the benchmarks that
`make bench` runs.

    .venv/bin/python bench/compare_trees.py --tree main=. --tree fix=/tmp/grid-fix
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
import models
from common import median, percentile, read_process
from gridstack import GridStack, seed_jobs, serve, start_grid, stop_grid
from httpload import SyncClient, build_request

import gridsite.stack

logger = logging.getLogger(__name__)

SUM_ID = "compare-row-sum"
DIGITS_ID = "compare-digits"
COLUMNS = 16 * 1024  # a [1, 16384] float32 input: a 64 KB body
CLIENTS = 16


def start_tree(root: Path, work_dir: Path, agents: int) -> GridStack:
    """Start a stack whose processes run the code under ``root``."""
    # Stack starts every process with ROOT as its working directory, which
    # comes first on sys.path, so the tree's own packages are imported.
    saved = gridsite.stack.ROOT
    gridsite.stack.ROOT = root
    try:
        return start_grid(work_dir, agents=agents, settings={"PYTHONPATH": str(root)})
    finally:
        gridsite.stack.ROOT = saved


def measure_latency(
    grids: dict[str, GridStack], count: int
) -> dict[str, dict[str, float]]:
    import safetensors.torch
    import torch

    body = safetensors.torch.save({"x": torch.rand(1, COLUMNS)})
    clients = {}
    for name, grid in grids.items():
        target = load.grid_target(grid, SUM_ID)
        request = build_request(
            target.host, target.port, target.path, body, target.headers
        )
        clients[name] = (SyncClient(target.host, target.port), request)
    latencies: dict[str, list[float]] = {name: [] for name in grids}
    names = list(grids)
    try:
        before = {
            name: read_process(grid.pid("gateway")) for name, grid in grids.items()
        }
        for index in range(count):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                client, request = clients[name]
                started = time.perf_counter()
                response = client.request(request)
                if response.status != 200:
                    raise RuntimeError(
                        f"{name}: request failed with {response.status}: {response.body[:200]!r}"
                    )
                latencies[name].append((time.perf_counter() - started) * 1000)
        after = {
            name: read_process(grid.pid("gateway")) for name, grid in grids.items()
        }
    finally:
        for client, _ in clients.values():
            client.close()
    return {
        name: {
            "p50": percentile(latencies[name], 0.5),
            "p99": percentile(latencies[name], 0.99),
            "gateway_cpu_ms": 1000
            * (after[name].cpu_seconds - before[name].cpu_seconds)
            / count,
        }
        for name in grids
    }


def measure_throughput(
    grids: dict[str, GridStack], work_dir: Path, rounds: int, seconds: float
) -> dict[str, list[dict[str, Any]]]:
    bodies = load.write_bodies(work_dir, "digit", load.digit_bodies(64))
    blocks: dict[str, list[dict[str, Any]]] = {name: [] for name in grids}
    names = list(grids)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            grid = grids[name]
            block = load.measure_block(
                load.grid_target(grid, DIGITS_ID),
                bodies,
                clients=CLIENTS,
                seconds=seconds,
                work_dir=work_dir,
                pids={"gateway": [grid.pid("gateway")]},
            )
            del block["latencies"]
            blocks[name].append(block)
            print(
                f"round {round_index + 1}, {name}: {block['rate']:.0f} req/s, p99 {block['p99']:.0f} ms, "
                f"gateway {block['gateway_cpu_ms']:.2f} ms of CPU per request",
                flush=True,
            )
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tree",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a source tree to start a gateway from; repeat, the first is the baseline",
    )
    parser.add_argument(
        "--agents", type=int, default=2, help="agents per stack (default: 2)"
    )
    parser.add_argument(
        "--seed-jobs",
        type=int,
        default=0,
        help="finished jobs to put in each job table first (default: 0)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=500,
        help="sequential 64 KB requests per tree (default: 500)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="throughput rounds (default: 3)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=4.0,
        help="seconds per throughput block (default: 4)",
    )
    args = parser.parse_args()
    common.configure()
    trees = {}
    for entry in args.tree:
        name, _, path = entry.partition("=")
        root = Path(path).resolve()
        if not (root / "gridsite" / "asgi.py").exists():
            parser.error(
                f"--tree {entry}: {root} is not a Grid source tree (no gridsite/asgi.py)"
            )
        trees[name] = root

    load_before = common.load_average()
    sum_archive, sum_signature = models.cached("row-sum", models.export_row_sum)
    digits_archive, digits_signature = models.cached("digits", models.export_digits)
    grids: dict[str, GridStack] = {}
    with tempfile.TemporaryDirectory(prefix="grid-bench-compare-") as tmp:
        try:
            for name, root in trees.items():
                grids[name] = start_tree(root, Path(tmp) / name, args.agents)
            for grid in grids.values():
                serve(grid, sum_archive, sum_signature, SUM_ID)
                serve(grid, digits_archive, digits_signature, DIGITS_ID)
                if args.seed_jobs:
                    seed_jobs(grid, DIGITS_ID, args.seed_jobs)
            latency = measure_latency(grids, args.requests)
            blocks = measure_throughput(grids, Path(tmp), args.rounds, args.seconds)
        finally:
            for grid in grids.values():
                stop_grid(grid)

    baseline = next(iter(trees))
    print(
        f"\nMachine: {common.machine_summary()}; load average {common.format_load(load_before)} "
        f"at the start, {common.format_load(common.load_average())} at the end."
    )
    headers = [
        "tree",
        "64 KB p50, ms",
        "64 KB p99, ms",
        "gateway CPU per request, ms",
        f"{CLIENTS} clients, req/s",
        f"ratio to {baseline} (each round)",
        f"gateway CPU per request at {CLIENTS} clients, ms",
    ]
    table = []
    for name in trees:
        ratios = [
            block["rate"] / base["rate"]
            for block, base in zip(blocks[name], blocks[baseline])
        ]
        table.append(
            [
                name,
                f"{latency[name]['p50']:.2f}",
                f"{latency[name]['p99']:.2f}",
                f"{latency[name]['gateway_cpu_ms']:.2f}",
                f"{median([block['rate'] for block in blocks[name]]):.0f}",
                ", ".join(f"{ratio:.2f}" for ratio in ratios),
                f"{median([block['gateway_cpu_ms'] for block in blocks[name]]):.2f}",
            ]
        )
    print("\n".join(common.markdown_table(headers, table)))


if __name__ == "__main__":
    main()
