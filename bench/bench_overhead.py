"""Measure Grid's overhead: remote inference through the stack against an in-process call.

Starts a Grid stack (gateway, Celery, --agents agents on 127.0.0.1) and serves
a model whose compute is trivial, ``x.sum(dim=1, keepdim=True)`` on a float32
[1, D] input, with D chosen so that the request body is about 1 KB, 64 KB,
1 MB and 16 MB. For each size, one client sends requests one at a time, and
each request is followed by the same model (loaded from the same .pt2 bytes)
called in-process on the same tensor, so both sides see the same machine load.
The overhead is the difference between the two: p50 minus p50, p99 minus p99.

The client is a blocking keep-alive socket (bench/httpload.py), and its CPU
per request (time.thread_time) is reported beside the figures, with the
gateway's and the agents' CPU per request read from /proc.

    .venv/bin/python bench/bench_overhead.py
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
from common import percentile, read_process
from gridstack import GridStack, open_grid, serve
from httpload import SyncClient, build_request

logger = logging.getLogger(__name__)

NAME = "overhead"
MODEL_ID = "overhead-row-sum"
# Body size label -> columns D of the [1, D] float32 input.
SIZES = {"1 KB": 256, "64 KB": 16 * 1024, "1 MB": 256 * 1024, "16 MB": 4 * 1024 * 1024}
SMOKE_SIZES = {"1 KB": 256, "64 KB": 16 * 1024}
# Requests per size in a full run: fewer for large bodies, which take longer.
REQUESTS = {"1 KB": 1000, "64 KB": 1000, "1 MB": 300, "16 MB": 100}
TARGET_P50_MS = 3.0
TARGET_P99_MS = 15.0


def measure_size(
    grid: GridStack,
    module: Any,
    columns: int,
    count: int,
    warmup: int,
) -> dict[str, Any]:
    """Interleave ``count`` remote requests with in-process calls; return the figures."""
    import safetensors.torch
    import torch

    torch.manual_seed(columns)
    tensor = torch.rand(1, columns)
    body = safetensors.torch.save({"x": tensor})
    target = load.grid_target(grid, MODEL_ID)
    request = build_request(target.host, target.port, target.path, body, target.headers)
    client = SyncClient(target.host, target.port)
    remote, local, local_full, client_cpu = [], [], [], []
    failed = 0
    processes = {name: grid.pid(name) for name in ["gateway", *grid.agents]}
    try:
        for _ in range(warmup):
            client.request(request)
            module(tensor)
        before = {name: read_process(pid) for name, pid in processes.items()}
        for _ in range(count):
            cpu_started = time.thread_time()
            started = time.perf_counter()
            response = client.request(request)
            remote_seconds = time.perf_counter() - started
            client_cpu.append(time.thread_time() - cpu_started)
            if response.status != 200:
                failed += 1
                logger.warning(
                    "request failed with %s: %s", response.status, response.body[:200]
                )
                continue
            remote.append(remote_seconds * 1000)

            started = time.perf_counter()
            with torch.inference_mode():
                module(tensor)
            local.append((time.perf_counter() - started) * 1000)

            # The same call with the safetensors decoding and encoding that a
            # server must do, for comparison.
            started = time.perf_counter()
            with torch.inference_mode():
                inputs = safetensors.torch.load(body)
                safetensors.torch.save({"output": module(inputs["x"])})
            local_full.append((time.perf_counter() - started) * 1000)
        after = {name: read_process(pid) for name, pid in processes.items()}
    finally:
        client.close()

    done = max(1, len(remote))
    gateway_cpu = after["gateway"].cpu_seconds - before["gateway"].cpu_seconds
    agents_cpu = sum(after[n].cpu_seconds - before[n].cpu_seconds for n in grid.agents)
    return {
        "body_bytes": len(body),
        "requests": count,
        "failed": failed,
        "local_p50": percentile(local, 0.5),
        "local_p99": percentile(local, 0.99),
        "local_full_p50": percentile(local_full, 0.5),
        "remote_p50": percentile(remote, 0.5),
        "remote_p99": percentile(remote, 0.99),
        "overhead_p50": percentile(remote, 0.5) - percentile(local, 0.5),
        "overhead_p99": percentile(remote, 0.99) - percentile(local, 0.99),
        "client_cpu_ms": 1000 * sum(client_cpu) / max(1, len(client_cpu)),
        "gateway_cpu_ms": 1000 * gateway_cpu / done,
        "agents_cpu_ms": 1000 * agents_cpu / done,
    }


def render(
    args: argparse.Namespace,
    rows: dict[str, dict[str, Any]],
    header: list[str],
    agents: int,
) -> str:
    lines = [
        "# Overhead: remote inference against an in-process call",
        "",
        *header,
        f"- {common.software_versions('torch', 'Django', 'channels', 'uvicorn', 'uvloop')}.",
        f"- Stack: one gateway process (uvicorn), Celery worker and beat, {common.plural(agents, 'agent')} "
        "(default settings: 1 torch thread, 1 ms batch window), PostgreSQL and Redis, all "
        "on this machine. Model: `x.sum(dim=1, keepdim=True)` on a float32 [1, D] input, "
        f"served on {common.plural(agents, 'replica')}.",
        "- One client, one request at a time over a keep-alive connection (bench/httpload.py). "
        "After each remote request, the same model (loaded from the same .pt2 bytes, "
        "1 torch thread) runs in-process on the same tensor.",
        "- Overhead = Grid minus in-process (model call only), p50 minus p50 and p99 minus p99. "
        '"In-process + safetensors" adds decoding the request body and encoding the output, '
        "which any server must do. CPU columns are per request: the client's (time.thread_time), "
        "the gateway process's and the agents' together (from /proc).",
        f"- Target at 64 KB: overhead p50 at most {TARGET_P50_MS:g} ms and p99 at most "
        f"{TARGET_P99_MS:g} ms.",
        "",
    ]
    headers = [
        "body",
        "requests",
        "failed",
        "in-process p50, ms",
        "in-process p99, ms",
        "in-process + safetensors p50, ms",
        "Grid p50, ms",
        "Grid p99, ms",
        "overhead p50, ms",
        "overhead p99, ms",
        "client CPU, ms",
        "gateway CPU, ms",
        "agents CPU, ms",
    ]
    table = [
        [
            f"{label} ({row['body_bytes']:,} B)",
            row["requests"],
            row["failed"],
            f"{row['local_p50']:.3f}",
            f"{row['local_p99']:.3f}",
            f"{row['local_full_p50']:.3f}",
            f"{row['remote_p50']:.2f}",
            f"{row['remote_p99']:.2f}",
            f"{row['overhead_p50']:.2f}",
            f"{row['overhead_p99']:.2f}",
            f"{row['client_cpu_ms']:.3f}",
            f"{row['gateway_cpu_ms']:.2f}",
            f"{row['agents_cpu_ms']:.2f}",
        ]
        for label, row in rows.items()
    ]
    lines += common.markdown_table(headers, table)
    lines.append("")
    lines += verdict(rows)
    lines += ["", f"![Latency by body size](../../docs/benchmarks/{NAME}.png)", ""]
    return "\n".join(lines)


def verdict(rows: dict[str, dict[str, Any]]) -> list[str]:
    row = rows.get("64 KB")
    if row is None:
        return ["- Target: not measured (no 64 KB run)."]
    p50_met = row["overhead_p50"] <= TARGET_P50_MS
    p99_met = row["overhead_p99"] <= TARGET_P99_MS
    lines = [
        f"- Target p50 at 64 KB: {row['overhead_p50']:.2f} ms against at most "
        f"{TARGET_P50_MS:g} ms: {'met' if p50_met else 'MISSED'}.",
        f"- Target p99 at 64 KB: {row['overhead_p99']:.2f} ms against at most "
        f"{TARGET_P99_MS:g} ms: {'met' if p99_met else 'MISSED'}.",
    ]
    if not (p50_met and p99_met):
        lines.append(
            f"- What holds it back: the gateway spends {row['gateway_cpu_ms']:.2f} ms of CPU "
            f"and the agents {row['agents_cpu_ms']:.2f} ms per request on 2 shared cores; "
            "see the hot-path notes on the benchmarks page."
        )
    return lines


def plot(args: argparse.Namespace, rows: dict[str, dict[str, Any]]) -> None:
    figure_axes = common.new_figure(
        "Latency by request body size (1 client)",
        "request body, bytes",
        "latency, ms",
        ylog=True,
    )
    if figure_axes is None:
        return
    figure, axes = figure_axes
    axes.set_xscale("log")
    sizes = [row["body_bytes"] for row in rows.values()]
    for key, label, style in [
        ("remote_p50", "Grid p50", "o-"),
        ("remote_p99", "Grid p99", "o--"),
        ("local_p50", "in-process p50", "s-"),
        ("local_full_p50", "in-process + safetensors p50", "s:"),
    ]:
        axes.plot(sizes, [row[key] for row in rows.values()], style, label=label)
    axes.legend()
    common.save_figure(args, figure, NAME)


def run(args: argparse.Namespace, work_dir: Path) -> dict[str, dict[str, Any]]:
    import models
    import torch

    torch.set_num_threads(1)
    archive, signature = models.cached("row-sum", models.export_row_sum)
    module = models.load_program(archive, work_dir / "row-sum.pt2")

    sizes = SMOKE_SIZES if args.smoke else SIZES
    if args.sizes:
        sizes = {label: SIZES[label] for label in args.sizes.split(",")}
    with open_grid(args, work_dir, agents=args.agents) as grid:
        args.agents = len(grid.agents)
        serve(grid, archive, signature, MODEL_ID)
        rows = {}
        for label, columns in sizes.items():
            count = args.requests or (20 if args.smoke else REQUESTS[label])
            rows[label] = measure_size(
                grid, module, columns, count, warmup=5 if args.smoke else 20
            )
            row = rows[label]
            print(
                f"{label}: Grid p50 {row['remote_p50']:.2f} ms p99 {row['remote_p99']:.2f} ms, "
                f"in-process p50 {row['local_p50']:.3f} ms, overhead p50 {row['overhead_p50']:.2f} ms "
                f"p99 {row['overhead_p99']:.2f} ms, client CPU {row['client_cpu_ms']:.3f} ms/request",
                flush=True,
            )
    return rows


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
        "--sizes",
        default=None,
        help=f"comma-separated body sizes among {', '.join(SIZES)} (default: all; smoke: 1 KB,64 KB)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per size (default: 1000 down to 100 by size)",
    )
    args = parser.parse_args()
    common.configure()
    args.agents = args.agents or (1 if args.smoke else 3)

    started = common.now()
    load_before = common.load_average()
    with tempfile.TemporaryDirectory(prefix="grid-bench-overhead-") as tmp:
        rows = run(args, args.work_dir or Path(tmp))
    header = common.header_lines(
        args, "bench_overhead.py", (load_before, common.load_average()), started
    )
    markdown = render(args, rows, header, args.agents)
    print(markdown)
    common.write_result(args, NAME, markdown, {"rows": rows})
    plot(args, rows)


if __name__ == "__main__":
    main()
