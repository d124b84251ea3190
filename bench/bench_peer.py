"""Compare Grid with Ray Serve on the same machine, models, inputs and concurrency.

Starts a Grid stack with 3 agents and, in the same run, Ray Serve with 3
replicas per model (bench/ray_serve_app.py), both serving the same .pt2
programs. Ray Serve is an optional extra (bench/requirements-peer.txt): when
it is not installed, or with --smoke, only Grid's side runs and the page says
so. Two measurements, each interleaving both systems:

- overhead: one client, 64 KB requests to ``x.sum(dim=1, keepdim=True)``,
  alternating Grid, Ray Serve and an in-process call of the same program;
- throughput: closed-loop clients (bench/httpload.py) at each concurrency
  level, one demo CNN image per request, the two systems one after the other
  in each round, their order swapped every round.

    .venv/bin/python bench/bench_peer.py
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import load
from common import median, percentile
from gridstack import GridStack, open_grid, serve
from httpload import SyncClient, build_request
from load import Target

logger = logging.getLogger(__name__)

NAME = "peer"
SUM_ID = "peer-row-sum"
DIGITS_ID = "peer-digits"
COLUMNS = 16 * 1024  # a [1, 16384] float32 input: a 64 KB body
LEVELS = [1, 4, 16, 64]
SMOKE_LEVELS = [4]
TARGET_RATIO = 3.0
RAY_START_SECONDS = 240.0


def ray_installed() -> bool:
    return (
        importlib.util.find_spec("ray") is not None
        and importlib.util.find_spec("ray.serve") is not None
    )


def start_ray(
    grid: GridStack, programs: dict[str, Path], replicas: int
) -> tuple[int, int]:
    """Start Ray Serve as a process of ``grid``'s stack; return (port, pid) once it serves."""
    port = common.free_port()
    command = [
        str(common.PYTHON),
        str(common.REPO / "bench" / "ray_serve_app.py"),
        "--port",
        str(port),
        "--replicas",
        str(replicas),
    ]
    for route, path in programs.items():
        command += ["--model", f"/{route}={path}"]
    process = grid.stack.start("ray", command)
    log = grid.stack.log_dir / "ray.log"
    deadline = time.monotonic() + RAY_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"Ray Serve exited with code {process.returncode}; see {log}"
            )
        if log.exists() and f"READY {port}" in log.read_text(errors="replace"):
            return port, process.pid
        time.sleep(0.5)
    raise RuntimeError(
        f"Ray Serve did not start within {RAY_START_SECONDS:g} s; see {log}"
    )


def process_tree(pid: int) -> list[int]:
    """Return ``pid`` and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    return [pid, *(child.pid for child in root.children(recursive=True))]


def measure_overhead(
    grid: GridStack, ray_port: int | None, module: Any, count: int
) -> dict[str, dict[str, float]]:
    """Alternate Grid, Ray Serve and in-process calls on one 64 KB input."""
    import safetensors.torch
    import torch

    tensor = torch.rand(1, COLUMNS)
    body = safetensors.torch.save({"x": tensor})
    grid_target = load.grid_target(grid, SUM_ID)
    sides: dict[str, tuple[SyncClient, bytes]] = {
        "Grid": (
            SyncClient(grid_target.host, grid_target.port),
            build_request(
                grid_target.host,
                grid_target.port,
                grid_target.path,
                body,
                grid_target.headers,
            ),
        )
    }
    if ray_port is not None:
        headers = {"Content-Type": "application/vnd.safetensors"}
        sides["Ray Serve"] = (
            SyncClient("127.0.0.1", ray_port),
            build_request("127.0.0.1", ray_port, f"/{SUM_ID}", body, headers),
        )
    latencies: dict[str, list[float]] = {name: [] for name in [*sides, "in-process"]}
    client_cpu: dict[str, float] = {name: 0.0 for name in sides}
    failed: dict[str, int] = {name: 0 for name in sides}
    try:
        for index in range(count + 10):
            names = list(sides) if index % 2 == 0 else list(reversed(sides))
            for name in names:
                client, request = sides[name]
                cpu_started = time.thread_time()
                started = time.perf_counter()
                response = client.request(request)
                elapsed = (time.perf_counter() - started) * 1000
                if index < 10:
                    continue  # warm-up
                client_cpu[name] += time.thread_time() - cpu_started
                if response.status == 200:
                    latencies[name].append(elapsed)
                else:
                    failed[name] += 1
            started = time.perf_counter()
            with torch.inference_mode():
                module(tensor)
            if index >= 10:
                latencies["in-process"].append((time.perf_counter() - started) * 1000)
    finally:
        for client, _ in sides.values():
            client.close()

    local = latencies["in-process"]
    rows = {
        "in-process": {"p50": percentile(local, 0.5), "p99": percentile(local, 0.99)}
    }
    for name in sides:
        values = latencies[name]
        rows[name] = {
            "p50": percentile(values, 0.5),
            "p99": percentile(values, 0.99),
            "overhead_p50": percentile(values, 0.5) - percentile(local, 0.5),
            "overhead_p99": percentile(values, 0.99) - percentile(local, 0.99),
            "failed": failed[name],
            "client_cpu_ms": 1000 * client_cpu[name] / count,
        }
    return rows


def measure_throughput(
    args: argparse.Namespace,
    work_dir: Path,
    targets: dict[str, Target],
    pids: dict[str, list[int]],
) -> dict[int, dict[str, list[dict[str, Any]]]]:
    bodies = load.write_bodies(work_dir, "digit", load.digit_bodies(64))
    for target in targets.values():
        if not args.smoke:
            load.run_load(target, bodies, clients=8, seconds=1.0, work_dir=work_dir)
    levels = SMOKE_LEVELS if args.smoke else LEVELS
    blocks: dict[int, dict[str, list[dict[str, Any]]]] = {
        level: {name: [] for name in targets} for level in levels
    }
    for round_index in range(args.rounds):
        for clients in levels:
            names = (
                list(targets)
                if (round_index + clients) % 2 == 0
                else list(reversed(targets))
            )
            for name in names:
                block = load.measure_block(
                    targets[name],
                    bodies,
                    clients=clients,
                    seconds=args.seconds,
                    work_dir=work_dir,
                    pids={"server": pids[name]},
                )
                del block["latencies"]
                blocks[clients][name].append(block)
                print(
                    f"round {round_index + 1}, {name}, {common.plural(clients, 'client')}: "
                    f"{block['rate']:.0f} req/s, p99 {block['p99']:.1f} ms, failed {block['failed']}, "
                    f"client {block['client_cores']:.2f} cores, server {block['server_cores']:.2f} cores",
                    flush=True,
                )
    return blocks


def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    import models
    import torch

    torch.set_num_threads(1)
    sum_archive, sum_signature = models.cached("row-sum", models.export_row_sum)
    digits_archive, digits_signature = models.cached("digits", models.export_digits)
    programs = {SUM_ID: work_dir / "row-sum.pt2", DIGITS_ID: work_dir / "digits.pt2"}
    module = models.load_program(sum_archive, programs[SUM_ID])
    programs[DIGITS_ID].write_bytes(digits_archive)

    ray_status = "not installed: `pip install -r bench/requirements-peer.txt` adds it"
    use_ray = ray_installed() and not args.smoke and not args.no_ray
    if ray_installed() and args.smoke:
        ray_status = (
            "installed, but skipped in smoke runs (Ray alone takes about 30 s to start)"
        )
    elif ray_installed() and args.no_ray:
        ray_status = "installed, but skipped (--no-ray)"

    with open_grid(args, work_dir, agents=args.agents) as grid:
        args.agents = len(grid.agents)
        serve(grid, sum_archive, sum_signature, SUM_ID)
        serve(grid, digits_archive, digits_signature, DIGITS_ID)
        grid_pids = [
            grid.pid(name) for name in ["gateway", "worker", "beat", *grid.agents]
        ]
        targets = {"Grid": load.grid_target(grid, DIGITS_ID)}
        pids = {"Grid": grid_pids}
        ray_port = None
        if use_ray:
            from importlib import metadata

            ray_port, ray_pid = start_ray(grid, programs, args.agents)
            ray_status = (
                f"ray {metadata.version('ray')}, 3 replicas per model, no batching"
            )
            targets["Ray Serve"] = Target(
                ray_port,
                f"/{DIGITS_ID}",
                {"Content-Type": "application/vnd.safetensors"},
            )
            pids["Ray Serve"] = process_tree(ray_pid)
        overhead = measure_overhead(grid, ray_port, module, args.requests)
        for name, row in overhead.items():
            print(
                f"{name}: p50 {row['p50']:.2f} ms, p99 {row['p99']:.2f} ms", flush=True
            )
        blocks = measure_throughput(args, work_dir, targets, pids)
    return {"overhead": overhead, "blocks": blocks, "ray_status": ray_status}


def summarize(
    blocks: dict[int, dict[str, list[dict[str, Any]]]],
) -> dict[int, dict[str, Any]]:
    rows = {}
    for clients, sides in blocks.items():
        row: dict[str, Any] = {}
        for name, runs in sides.items():
            row[name] = {
                "rate": median([block["rate"] for block in runs]),
                "p99": median([block["p99"] for block in runs]),
                "failed": sum(block["failed"] for block in runs),
                "client_cores": median([block["client_cores"] for block in runs]),
                "server_cpu_ms": median([block["server_cpu_ms"] for block in runs]),
            }
        if "Ray Serve" in sides:
            row["ratio"] = median(
                [
                    g["rate"] / max(1e-9, r["rate"])
                    for g, r in zip(sides["Grid"], sides["Ray Serve"])
                ]
            )
        rows[clients] = row
    return rows


def render(args: argparse.Namespace, data: dict[str, Any], header: list[str]) -> str:
    overhead = data["overhead"]
    rows = summarize(data["blocks"])
    has_ray = "Ray Serve" in overhead
    lines = [
        "# Peer: Grid and Ray Serve in the same run",
        "",
        *header,
        f"- {common.software_versions('torch', 'Django', 'channels', 'uvicorn', 'ray')}.",
        f"- Ray Serve: {data['ray_status']}.",
        f"- Grid: one gateway process, Celery worker and beat, {common.plural(args.agents, 'agent')} "
        "(1 torch thread each, 1 ms batch window). Ray Serve: a local Ray cluster limited to "
        f"2 CPUs, {common.plural(args.agents, 'replica')} per model, each loading the same .pt2 "
        "with torch.export.load and running it with 1 torch thread, safetensors in and out. "
        "Both run on this machine at the same time.",
        f"- Overhead: one client, {args.requests} requests of 64 KB to each system, alternating "
        "with each other and with an in-process call of the same program. Overhead = p50 minus "
        "the in-process p50 (p99 likewise). Client CPU per request is time.thread_time.",
        f"- Throughput: demo CNN, one image per request, {args.rounds} rounds of {args.seconds:g} s "
        "per level and system. Ratio = median over rounds of Grid's rate over Ray Serve's in the "
        "same round. Server CPU per request: all processes of the system (Grid: gateway, "
        "worker, beat, agents; Ray: the driver and every process under it), from /proc.",
        f"- Targets: Grid's overhead below Ray Serve's; Grid's throughput at 16 clients at least "
        f"{TARGET_RATIO:g} times Ray Serve's.",
        "",
        "## Overhead at 64 KB, one client",
        "",
    ]
    headers = [
        "system",
        "p50, ms",
        "p99, ms",
        "overhead p50, ms",
        "overhead p99, ms",
        "failed",
        "client CPU, ms",
    ]
    table = []
    for name, row in overhead.items():
        if name == "in-process":
            table.append(
                [name, f"{row['p50']:.3f}", f"{row['p99']:.3f}", "", "", "", ""]
            )
            continue
        table.append(
            [
                name,
                f"{row['p50']:.2f}",
                f"{row['p99']:.2f}",
                f"{row['overhead_p50']:.2f}",
                f"{row['overhead_p99']:.2f}",
                row["failed"],
                f"{row['client_cpu_ms']:.3f}",
            ]
        )
    lines += common.markdown_table(headers, table)
    lines += ["", "## Throughput, demo CNN", ""]
    sides = ["Grid", "Ray Serve"] if has_ray else ["Grid"]
    headers = ["clients"]
    for name in sides:
        headers += [
            f"{name} req/s",
            f"{name} p99, ms",
            f"{name} failed",
            f"{name} client CPU, cores",
            f"{name} server CPU per request, ms",
        ]
    if has_ray:
        headers.append("Grid / Ray Serve")
    table = []
    for clients, row in rows.items():
        cells: list[object] = [clients]
        for name in sides:
            side = row[name]
            cells += [
                f"{side['rate']:,.0f}",
                f"{side['p99']:.1f}",
                side["failed"],
                f"{side['client_cores']:.2f}",
                f"{side['server_cpu_ms']:.2f}",
            ]
        if has_ray:
            cells.append(f"{row['ratio']:.2f}x")
        table.append(cells)
    lines += common.markdown_table(headers, table)
    lines += [
        "",
        *verdict(overhead, rows),
        "",
        f"![Grid and Ray Serve throughput](../../docs/benchmarks/{NAME}.png)",
        "",
    ]
    return "\n".join(lines)


def verdict(
    overhead: dict[str, dict[str, float]], rows: dict[int, dict[str, Any]]
) -> list[str]:
    if "Ray Serve" not in overhead:
        return ["- Targets: not measured, because Ray Serve did not run."]
    grid, ray = overhead["Grid"], overhead["Ray Serve"]
    below = grid["overhead_p50"] < ray["overhead_p50"]
    lines = [
        f"- Target, overhead below Ray Serve's: Grid p50 {grid['overhead_p50']:.2f} ms against "
        f"Ray Serve {ray['overhead_p50']:.2f} ms (p99 {grid['overhead_p99']:.2f} against "
        f"{ray['overhead_p99']:.2f} ms): {'met' if below else 'MISSED'}."
    ]
    row = rows.get(16)
    if row is None:
        lines.append(
            "- Target at 16 clients: not measured (no 16-client level in this run)."
        )
    else:
        met = row["ratio"] >= TARGET_RATIO
        lines.append(
            f"- Target, throughput at 16 clients at least {TARGET_RATIO:g}x Ray Serve's: "
            f"{row['ratio']:.2f}x ({row['Grid']['rate']:,.0f} against {row['Ray Serve']['rate']:,.0f} "
            f"req/s): {'met' if met else 'MISSED'}."
        )
    return lines


def plot(args: argparse.Namespace, data: dict[str, Any]) -> None:
    rows = summarize(data["blocks"])
    figure_axes = common.new_figure(
        "Grid and Ray Serve, demo CNN, same run",
        "concurrent clients",
        "requests/s",
        xlog=True,
    )
    if figure_axes is None:
        return
    figure, axes = figure_axes
    levels = list(rows)
    for name, style in [("Grid", "o-"), ("Ray Serve", "s--")]:
        if name in rows[levels[0]]:
            axes.plot(
                levels,
                [rows[level][name]["rate"] for level in levels],
                style,
                label=name,
            )
    axes.set_ylim(bottom=0)
    axes.legend()
    common.save_figure(args, figure, NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_arguments(parser)
    parser.add_argument(
        "--agents",
        type=int,
        default=None,
        help="Grid agents and Ray replicas (default: 3; smoke: 1)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="overhead requests per system (default: 500; smoke: 20)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="seconds per throughput block (default: 4; smoke: 0.5)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="throughput rounds (default: 2; smoke: 1)",
    )
    parser.add_argument("--no-ray", action="store_true", help="run Grid's side only")
    args = parser.parse_args()
    common.configure()
    args.agents = args.agents or (1 if args.smoke else 3)
    args.requests = args.requests or (20 if args.smoke else 500)
    args.seconds = args.seconds or (0.5 if args.smoke else 4.0)
    args.rounds = args.rounds or (1 if args.smoke else 2)
    if not ray_installed():
        print(
            "Ray Serve is not installed, so only Grid's side runs: pip install -r bench/requirements-peer.txt",
            flush=True,
        )

    started = common.now()
    load_before = common.load_average()
    with tempfile.TemporaryDirectory(prefix="grid-bench-peer-") as tmp:
        data = run(args, args.work_dir or Path(tmp))
    header = common.header_lines(
        args, "bench_peer.py", (load_before, common.load_average()), started
    )
    markdown = render(args, data, header)
    print(markdown)
    common.write_result(args, NAME, markdown, data)
    plot(args, data)


if __name__ == "__main__":
    main()
