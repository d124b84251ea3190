"""Measure model placement: time to place a large model on 3 replicas, and gateway memory.

Starts a Grid stack with --agents agents. For each size (10, 100 and 500 MB),
a model with one large constant weight is exported with torch.export and
served with one replica per agent. The time runs from the start of the
upload to the moment every placement is ready in PostgreSQL (polled every
100 ms). A sampler reads the gateway process's VmRSS every 50 ms meanwhile,
and its VmHWM (peak RSS) after each size.

In the same run, before and after each Grid placement, the same bytes are
copied raw over loopback TCP the way Grid moves them: the client's upload to
one receiver that writes them to disk, then that file sent to one receiver
per replica at once, each writing it to disk. The raw figure is the median
of the two copies. The agent's own work after a transfer (SHA-256 of the
file and torch.export.load) is timed in-process for reference.

    .venv/bin/python bench/bench_placement.py
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common
from common import median, read_process
from gridstack import GridStack, open_grid, wait_placed

logger = logging.getLogger(__name__)

NAME = "placement"
SIZES_MB = [10, 100, 500]
SMOKE_SIZES_MB = [1]
TARGET_RATIO = 0.5
BUFFER_BYTES = 1 << 20


def _receive(server: socket.socket, target: Path) -> None:
    connection, _ = server.accept()
    buffer = bytearray(BUFFER_BYTES)
    view = memoryview(buffer)
    with connection, target.open("wb") as out:
        while True:
            count = connection.recv_into(buffer)
            if not count:
                return
            out.write(view[:count])


def _listen() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    return server


def _send(port: int, source: Path) -> None:
    with (
        socket.create_connection(("127.0.0.1", port)) as sock,
        source.open("rb") as file,
    ):
        sock.sendfile(file)


def copy_to(source: Path, targets: list[Path]) -> None:
    """Send ``source`` over loopback TCP to one receiving thread per target, all at once."""
    servers = [_listen() for _ in targets]
    receivers = [
        threading.Thread(target=_receive, args=(server, target))
        for server, target in zip(servers, targets)
    ]
    senders = [
        threading.Thread(target=_send, args=(server.getsockname()[1], source))
        for server in servers
    ]
    try:
        for thread in receivers + senders:
            thread.start()
        for thread in receivers + senders:
            thread.join(timeout=600)
    finally:
        for server in servers:
            server.close()


def raw_copy(source: Path, replicas: int, work_dir: Path) -> dict[str, float]:
    """Copy ``source`` as Grid moves it: upload to a staging file, then to each replica."""
    staged = work_dir / "raw-staged.bin"
    copies = [work_dir / f"raw-replica-{index}.bin" for index in range(replicas)]
    started = time.perf_counter()
    copy_to(source, [staged])
    uploaded = time.perf_counter()
    copy_to(staged, copies)
    finished = time.perf_counter()
    for path in [staged, *copies]:
        path.unlink(missing_ok=True)
    return {"upload": uploaded - started, "total": finished - started}


def agent_work(path: Path) -> float:
    """Time what an agent does after a transfer: hash the file and load the program."""
    import torch

    started = time.perf_counter()
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(BUFFER_BYTES):
            digest.update(chunk)
    program = torch.export.load(str(path))
    elapsed = time.perf_counter() - started
    del program
    return elapsed


class RssSampler:
    """Samples a process's VmRSS every ``period`` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        self.pid = pid
        self.period = period
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, read_process(self.pid).rss_bytes)
            except ProcessLookupError:
                return
            self._stop.wait(self.period)


def place(
    grid: GridStack,
    archive: bytes,
    signature: list[dict[str, Any]],
    model_id: str,
    replicas: int,
    timeout: float,
) -> dict[str, float]:
    """Serve ``archive`` and return the seconds to upload it and to have every replica ready."""
    started = time.perf_counter()
    with grid.client() as gateway:
        gateway.serve_model(
            archive,
            model_id,
            replicas=replicas,
            input_signature=signature,
            wait=False,
            progress=False,
            timeout=timeout,
        )
    uploaded = time.perf_counter()
    wait_placed(grid, model_id, replicas, timeout)
    return {"upload": uploaded - started, "total": time.perf_counter() - started}


def run(args: argparse.Namespace, work_dir: Path) -> list[dict[str, Any]]:
    import models

    sizes = (
        SMOKE_SIZES_MB
        if args.smoke
        else [int(value) for value in args.sizes.split(",")]
    )
    rows = []
    with open_grid(args, work_dir, agents=args.agents) as grid:
        args.agents = len(grid.agents)
        gateway_pid = grid.pid("gateway")
        baseline = read_process(gateway_pid)
        # An agent's first torch.export.load in its process costs seconds of
        # imports, so a small untimed placement goes first.
        warm_archive, warm_signature = models.export_big_weight(2**20)
        place(
            grid,
            warm_archive,
            warm_signature,
            "placement-warm-up",
            args.agents,
            args.timeout,
        )
        for size in sizes:
            archive, signature = models.export_big_weight(size * 2**20)
            path = work_dir / f"big-{size}.pt2"
            path.write_bytes(archive)
            archive_bytes = len(archive)
            raw_before = raw_copy(path, args.agents, work_dir)
            with RssSampler(gateway_pid) as sampler:
                grid_times = place(
                    grid,
                    archive,
                    signature,
                    f"placement-{size}mb",
                    args.agents,
                    args.timeout,
                )
            raw_after = raw_copy(path, args.agents, work_dir)
            hwm = read_process(gateway_pid).hwm_bytes
            local = agent_work(path)
            del archive
            path.unlink()
            raw_total = median([raw_before["total"], raw_after["total"]])
            row = {
                "size_mb": size,
                "archive_bytes": archive_bytes,
                "grid_upload": grid_times["upload"],
                "grid_total": grid_times["total"],
                "raw_upload": median([raw_before["upload"], raw_after["upload"]]),
                "raw_total": raw_total,
                "ratio": raw_total / grid_times["total"],
                "agent_work": local,
                "rss_peak": sampler.peak,
                "hwm": hwm,
                "rss_baseline": baseline.rss_bytes,
            }
            rows.append(row)
            print(
                f"{size} MB: Grid {row['grid_total']:.2f} s (upload {row['grid_upload']:.2f} s), raw copy "
                f"{raw_total:.2f} s, ratio {row['ratio']:.2f}, gateway peak RSS {sampler.peak / 2**20:.0f} MiB, "
                f"VmHWM {hwm / 2**20:.0f} MiB",
                flush=True,
            )
    return rows


def render(
    args: argparse.Namespace, rows: list[dict[str, Any]], header: list[str]
) -> str:
    lines = [
        "# Placement: large models on every replica",
        "",
        *header,
        f"- {common.software_versions('torch', 'Django', 'channels', 'uvicorn', 'websockets')}.",
        f"- Stack: one gateway process, Celery worker and beat, {common.plural(args.agents, 'agent')}; "
        "each model is served on every agent. Model: one float32 weight of the given size plus "
        "`x + weight[:1]`, exported with torch.export (weights stored raw, as gridproto/pt2.py requires).",
        "- Grid: from the start of gridclient's upload (multipart POST /api/models/) to every "
        "placement ready in PostgreSQL (polled every 100 ms). This includes the gateway's check "
        "and staging of the upload, the transfer to each agent in 1 MiB websocket frames, and "
        "each agent's SHA-256 check and torch.export.load.",
        f"- Raw copy: the same bytes over loopback TCP (socket.sendfile to a thread that writes "
        f"them to disk), once to a staging file and then to {common.plural(args.agents, 'receiver')} at once; "
        "median of one copy before and one after the Grid placement. Ratio = raw time over Grid "
        "time (1.00 = as fast as the raw copy).",
        "- Agent's own work: SHA-256 of the file and torch.export.load, timed once in the "
        "benchmark process; each agent does it after its transfer. A 1 MB model is placed "
        "first, untimed, because an agent's first torch.export.load pays for imports.",
        "- Gateway memory: the peak of VmRSS sampled every 50 ms during the placement, and "
        "VmHWM (the peak since the process started) after it; sizes run in increasing order.",
        f"- Targets: placement at least {TARGET_RATIO:g} times as fast as the raw copy (ratio at "
        "least 0.50); gateway RSS that does not grow with model size.",
        "",
    ]
    headers = [
        "model",
        "Grid total, s",
        "Grid upload, s",
        "raw copy, s",
        "raw upload, s",
        "ratio",
        "agent's own work, s",
        "gateway RSS peak, MiB",
        "gateway VmHWM, MiB",
    ]
    table = [
        [
            f"{row['size_mb']} MB",
            f"{row['grid_total']:.2f}",
            f"{row['grid_upload']:.2f}",
            f"{row['raw_total']:.2f}",
            f"{row['raw_upload']:.2f}",
            f"{row['ratio']:.2f}",
            f"{row['agent_work']:.2f}",
            f"{row['rss_peak'] / 2**20:.0f}",
            f"{row['hwm'] / 2**20:.0f}",
        ]
        for row in rows
    ]
    lines += common.markdown_table(headers, table)
    lines += [
        "",
        *verdict(rows),
        "",
        f"![Placement time and gateway RSS by model size](../../docs/benchmarks/{NAME}.png)",
        "",
    ]
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    worst = min(rows, key=lambda row: row["ratio"])
    lines = [
        f"- Target, at least half as fast as the raw copy: worst ratio {worst['ratio']:.2f} at "
        f"{worst['size_mb']} MB: {'met' if worst['ratio'] >= TARGET_RATIO else 'MISSED'}."
    ]
    if worst["ratio"] < TARGET_RATIO:
        after_upload = worst["grid_total"] - worst["grid_upload"]
        raw_fan_out = worst["raw_total"] - worst["raw_upload"]
        lines.append(
            f"  - What holds it back: at {worst['size_mb']} MB the upload takes "
            f"{worst['grid_upload']:.2f} s against {worst['raw_upload']:.2f} s raw, and the rest "
            f"(staging, the Celery task that starts the transfers, 1 MiB websocket frames to "
            f"each agent, each agent's hash and load) {after_upload:.2f} s against "
            f"{raw_fan_out:.2f} s for the raw copy to the replicas plus {worst['agent_work']:.2f} s "
            "of one agent's own work."
        )
    smallest, largest = rows[0], rows[-1]
    growth = (largest["rss_peak"] - smallest["rss_peak"]) / 2**20
    size_growth = largest["size_mb"] - smallest["size_mb"]
    flat = growth < 0.1 * max(1, size_growth)
    lines.append(
        f"- Target, gateway RSS flat in model size: peak RSS {smallest['rss_peak'] / 2**20:.0f} MiB at "
        f"{smallest['size_mb']} MB and {largest['rss_peak'] / 2**20:.0f} MiB at {largest['size_mb']} MB "
        f"({growth:+.0f} MiB for {size_growth} MB more model): {'met' if flat else 'MISSED'}."
    )
    return lines


def plot(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    figure_axes = common.new_figure(
        "Placement on every replica", "model size, MB", "seconds", xlog=False
    )
    if figure_axes is None or not rows:
        return
    figure, axes = figure_axes
    sizes = [row["size_mb"] for row in rows]
    axes.plot(
        sizes,
        [row["grid_total"] for row in rows],
        "o-",
        label="Grid, upload to all ready",
    )
    axes.plot(
        sizes,
        [row["raw_total"] for row in rows],
        "s--",
        label="raw TCP copy, same bytes",
    )
    axes.set_ylim(bottom=0)
    memory = axes.twinx()
    memory.plot(
        sizes,
        [row["rss_peak"] / 2**20 for row in rows],
        "^:",
        color="tab:green",
        label="gateway RSS peak, MiB",
    )
    memory.set_ylabel("gateway RSS, MiB")
    memory.set_ylim(bottom=0)
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
        "--sizes",
        default=",".join(map(str, SIZES_MB)),
        help="comma-separated model sizes in MB (default: 10,100,500; smoke: 1)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds one placement may take (default: 600)",
    )
    args = parser.parse_args()
    common.configure()
    args.agents = args.agents or (1 if args.smoke else 3)

    started = common.now()
    load_before = common.load_average()
    with tempfile.TemporaryDirectory(prefix="grid-bench-placement-") as tmp:
        rows = run(args, args.work_dir or Path(tmp))
    header = common.header_lines(
        args, "bench_placement.py", (load_before, common.load_average()), started
    )
    markdown = render(args, rows, header)
    print(markdown)
    common.write_result(args, NAME, markdown, {"rows": rows})
    plot(args, rows)


if __name__ == "__main__":
    main()
