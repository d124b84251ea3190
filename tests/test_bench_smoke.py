"""Smoke runs of the benchmark scripts under bench/: tiny sizes, seconds each.

They check that every script still runs and writes its table, not what the
figures are. One stack, with two agents and a 0.5 s heartbeat interval,
serves every script (``--attach``), because starting one per script would
cost more than all the smoke runs together. The scripts run two at a time;
bench_failover.py kills an agent, so it runs alone after the others.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

# Script -> the name of its table, bench/results/<name>.md.
ATTACHED = {
    "bench_overhead.py": "overhead",
    "bench_throughput.py": "throughput",
    "bench_peer.py": "peer",
    "bench_placement.py": "placement",
    "bench_heartbeat.py": "heartbeat",
}
STANDALONE = {"bench_batching.py": "batching"}
LAST = {"bench_failover.py": "failover"}
SCRIPTS = {**ATTACHED, **STANDALONE, **LAST}

pytestmark = pytest.mark.e2e


def run_smoke(
    script: str, output: Path, stack_file: Path | None
) -> subprocess.CompletedProcess:
    output.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        str(BENCH / script),
        "--smoke",
        "--results-dir",
        str(output),
        "--plots-dir",
        str(output),
    ]
    if stack_file is not None:
        command += ["--attach", str(stack_file), "--work-dir", str(output)]
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=180
    )


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Run every script's smoke run once; return its process result and output folder."""
    sys.path.insert(0, str(BENCH))
    try:
        from gridstack import save_stack_file, start_grid, stop_grid
    finally:
        sys.path.remove(str(BENCH))

    root = tmp_path_factory.mktemp("bench-smoke")
    grid = start_grid(
        root / "stack", agents=2, settings={"GRID_HEARTBEAT_INTERVAL": "0.5"}
    )
    try:
        stack_file = root / "stack.json"
        save_stack_file(grid, stack_file)

        def run(script: str) -> tuple[subprocess.CompletedProcess, Path]:
            output = root / script.removesuffix(".py")
            attach = None if script in STANDALONE else stack_file
            return run_smoke(script, output, attach), output

        with ThreadPoolExecutor(max_workers=2) as pool:
            runs = dict(
                zip([*ATTACHED, *STANDALONE], pool.map(run, [*ATTACHED, *STANDALONE]))
            )
        for script in LAST:
            runs[script] = run(script)
        return runs
    finally:
        stop_grid(grid)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_bench_smoke_writes_table(script, smoke_runs):
    result, output = smoke_runs[script]
    assert result.returncode == 0, (
        f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    table = (output / f"{SCRIPTS[script]}.md").read_text()
    assert "| --- |" in table, f"{SCRIPTS[script]}.md has no table:\n{table}"
    assert "--smoke" in table, "the table does not name the command that wrote it"


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_bench_smoke_draws_plot(script, smoke_runs):
    pytest.importorskip("matplotlib")
    _, output = smoke_runs[script]
    assert (output / f"{SCRIPTS[script]}.png").stat().st_size > 0
