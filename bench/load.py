"""Load from the lean client (bench/httpload.py), run in its own process.

A separate process keeps the client's CPU apart from the script's, and its
getrusage figure is the client's own CPU, reported beside each result.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import PYTHON, REPO, percentile, read_process
from gridstack import GridStack


@dataclass(frozen=True)
class Target:
    """An HTTP endpoint on loopback to send a load to, and the headers it needs."""

    port: int
    path: str
    headers: dict[str, str]
    host: str = "127.0.0.1"


def grid_target(grid: GridStack, model_id: str) -> Target:
    return Target(
        grid.port,
        f"/api/models/{model_id}/infer/",
        {
            "Authorization": f"Bearer {grid.token}",
            "Content-Type": "application/vnd.safetensors",
        },
    )


@dataclass
class LoadResult:
    """Every request of one closed-loop run, and the client's CPU time."""

    # (start as time.perf_counter(), latency in s, HTTP status or 0 for a
    # connection error, X-Grid-Attempts)
    records: list[tuple[float, float, int, int]]
    cpu_seconds: float
    seconds: float

    def ok_latencies_ms(self) -> list[float]:
        return [record[1] * 1000 for record in self.records if record[2] == 200]

    def failed(self) -> int:
        return sum(1 for record in self.records if record[2] != 200)

    def rate(self) -> float:
        """Return successful requests per second over the run."""
        return len(self.ok_latencies_ms()) / self.seconds

    def client_cpu_share(self) -> float:
        """Return the client's CPU over the run, in cores."""
        return self.cpu_seconds / self.seconds

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for record in self.records:
            counts[record[2]] = counts.get(record[2], 0) + 1
        return counts


class LoadRun:
    """A closed-loop load running in a bench/httpload.py process."""

    def __init__(
        self,
        target: Target,
        body_files: Sequence[Path],
        *,
        clients: int,
        seconds: float,
        work_dir: Path,
        timeout: float = 60.0,
        start_delay: float = 0.3,
    ) -> None:
        self.seconds = seconds
        run_id = uuid.uuid4().hex[:8]
        spec_path = work_dir / f"load-{run_id}.json"
        self.result_path = work_dir / f"load-{run_id}-result.json"
        # The clients connect first and start together at start_at.
        self.start_at = time.perf_counter() + start_delay
        spec = {
            "host": target.host,
            "port": target.port,
            "path": target.path,
            "headers": target.headers,
            "body_files": [str(path) for path in body_files],
            "clients": clients,
            "seconds": seconds,
            "timeout": timeout,
            "start_at": self.start_at,
        }
        spec_path.write_text(json.dumps(spec))
        self.process = subprocess.Popen(
            [
                str(PYTHON),
                str(REPO / "bench" / "httpload.py"),
                str(spec_path),
                str(self.result_path),
            ],
            cwd=REPO,
        )
        self.timeout = timeout

    def result(self) -> LoadResult:
        """Wait for the run to end and return its requests."""
        try:
            code = self.process.wait(timeout=self.seconds + self.timeout + 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError("the load generator did not finish in time") from None
        if code != 0:
            raise RuntimeError(f"the load generator exited with code {code}")
        data = json.loads(self.result_path.read_text())
        return LoadResult(
            [tuple(record) for record in data["records"]],
            data["cpu_seconds"],
            self.seconds,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def run_load(
    target: Target,
    body_files: Sequence[Path],
    *,
    clients: int,
    seconds: float,
    work_dir: Path,
    timeout: float = 60.0,
) -> LoadResult:
    """Run a closed-loop load to the end and return its requests."""
    run = LoadRun(
        target,
        body_files,
        clients=clients,
        seconds=seconds,
        work_dir=work_dir,
        timeout=timeout,
    )
    try:
        return run.result()
    finally:
        run.stop()


def measure_block(
    target: Target,
    body_files: Sequence[Path],
    *,
    clients: int,
    seconds: float,
    work_dir: Path,
    pids: dict[str, list[int]],
) -> dict[str, Any]:
    """Run one closed-loop block and return its figures with the CPU of ``pids``.

    ``pids`` maps a label (such as "gateway" or "agents") to the processes
    whose CPU is added up under it; the result has "<label>_cores" (CPU
    seconds over the load's duration, so the half second in which the client
    connects counts as load time) and "<label>_cpu_ms" per successful request.
    """
    before = {
        label: [read_process(pid) for pid in group] for label, group in pids.items()
    }
    result = run_load(
        target, body_files, clients=clients, seconds=seconds, work_dir=work_dir
    )
    after = {
        label: [read_process(pid) for pid in group] for label, group in pids.items()
    }
    latencies = result.ok_latencies_ms()
    figures: dict[str, Any] = {
        "clients": clients,
        "rate": result.rate(),
        "ok": len(latencies),
        "failed": result.failed(),
        "statuses": result.statuses(),
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "latencies": latencies,
        "client_cores": result.client_cpu_share(),
    }
    for label in pids:
        used = sum(
            last.cpu_seconds - first.cpu_seconds
            for first, last in zip(before[label], after[label])
        )
        figures[f"{label}_cores"] = used / seconds
        figures[f"{label}_cpu_ms"] = 1000 * used / max(1, len(latencies))
    return figures


def write_bodies(work_dir: Path, name: str, bodies: Sequence[bytes]) -> list[Path]:
    """Write request bodies to files for the load generator; return their paths."""
    paths = []
    for index, body in enumerate(bodies):
        path = work_dir / f"{name}-{index}.safetensors"
        path.write_bytes(body)
        paths.append(path)
    return paths


def digit_bodies(count: int, seed: int = 1) -> list[bytes]:
    """Return ``count`` safetensors bodies, each one random 1x1x8x8 image."""
    import safetensors.torch
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [
        safetensors.torch.save({"images": torch.rand(1, 1, 8, 8, generator=generator)})
        for _ in range(count)
    ]
