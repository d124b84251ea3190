"""Shared parts of the benchmark scripts: options, machine facts, /proc readings, output.

Every script starts its own Grid stack on a fresh database (bench/gridstack.py),
measures, and writes a markdown table to bench/results/<name>.md and a plot
to docs/benchmarks/<name>.png. ``bench/report.py`` joins the tables into
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gridsite.stack import free_port  # noqa: E402,F401

logger = logging.getLogger(__name__)

RESULTS_DIR = REPO / "bench" / "results"
PLOTS_DIR = REPO / "docs" / "benchmarks"
PYTHON = Path(sys.executable)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options every benchmark script takes."""
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes and durations, to check that the script works (seconds)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="folder for the markdown table (default: bench/results)",
    )
    parser.add_argument(
        "--plots-dir",
        type=Path,
        default=PLOTS_DIR,
        help="folder for the PNG plot (default: docs/benchmarks)",
    )
    parser.add_argument(
        "--attach",
        type=Path,
        default=None,
        help="use the running stack described in this JSON file (written by the smoke test) "
        "instead of starting one",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="folder for process logs and temporary files (default: a new temporary folder)",
    )


def configure() -> None:
    """Set up logging, and make SIGTERM raise SystemExit so that every finally block runs.

    Without the handler, SIGTERM would end a script at once and leave the
    stack it started running.
    """
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    logging.basicConfig(
        level=os.environ.get("BENCH_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # One line per HTTP request of the client's polling is noise here.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("gridclient").setLevel(logging.WARNING)


# Machine and run facts.


def cpu_model() -> str:
    """Return lscpu's "Model name", or /proc/cpuinfo's when lscpu is missing."""
    for source in ("lscpu", "/proc/cpuinfo"):
        try:
            if source == "lscpu":
                import subprocess

                text = subprocess.run(
                    ["lscpu"], capture_output=True, text=True, timeout=10
                ).stdout
            else:
                text = Path(source).read_text()
        except (OSError, ValueError):
            continue
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name.strip().lower() in {"model name"}:
                return value.strip()
    return platform.processor() or "unknown CPU"


def memory_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_summary() -> str:
    """Return one line: CPU model, core count and memory."""
    return (
        f"{cpu_model()}, {os.cpu_count()} cores (nproc), "
        f"{memory_total_bytes() / 1024**3:.1f} GiB memory (MemTotal)"
    )


def software_versions(*names: str) -> str:
    """Return "name version" for each importable package among ``names``."""
    from importlib import metadata

    found = [f"Python {platform.python_version()}"]
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def format_load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{value:.2f}" for value in load)


def reproduce_command(script: str, smoke: bool = False) -> str:
    """Return the shell command that reruns ``script`` from the repository root."""
    command = f".venv/bin/python bench/{script}"
    return command + " --smoke" if smoke else command


def raise_open_files_limit(requested: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit toward ``requested``; return the new soft limit.

    Child processes (the gateway among them) inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(requested, hard) if hard != resource.RLIM_INFINITY else requested
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# Statistics.


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile (``fraction`` in 0..1); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, int(round(fraction * len(ordered) + 0.5)))
    return ordered[min(len(ordered), rank) - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# Process readings from /proc.


@dataclass
class ProcessReading:
    """CPU time, resident memory and its peak of one process at one moment."""

    at: float
    cpu_seconds: float
    rss_bytes: int
    hwm_bytes: int


def read_process(pid: int) -> ProcessReading:
    """Read user+system CPU time and VmRSS/VmHWM of ``pid`` from /proc.

    Raises ProcessLookupError when the process is gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    # The command name in brackets may contain spaces, so split after it.
    fields = stat.rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    memory = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in {"VmRSS", "VmHWM"}:
            memory[name] = int(value.split()[0]) * 1024
    return ProcessReading(
        time.perf_counter(), cpu, memory.get("VmRSS", 0), memory.get("VmHWM", 0)
    )


def cpu_share(before: ProcessReading, after: ProcessReading) -> float:
    """Return the CPU used between two readings, in cores (1.0 is one core busy)."""
    return (after.cpu_seconds - before.cpu_seconds) / max(1e-9, after.at - before.at)


# Output.


def write_result(
    args: argparse.Namespace, name: str, markdown: str, data: dict[str, Any]
) -> Path:
    """Write ``bench/results/<name>.md`` and the figures as ``<name>.json``."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{name}.md"
    path.write_text(markdown)
    (args.results_dir / f"{name}.json").write_text(
        json.dumps(data, indent=1, default=str)
    )
    return path


def header_lines(
    args: argparse.Namespace,
    script: str,
    loads: tuple[tuple[float, float, float], tuple[float, float, float]],
    started: datetime,
) -> list[str]:
    """Return the bullet lines every result page starts with."""
    before, after = loads
    return [
        f"- Written by `{reproduce_command(script, args.smoke)}` on "
        f"{started:%Y-%m-%d %H:%M} UTC{' (smoke run: tiny sizes)' if args.smoke else ''}.",
        f"- Machine: {machine_summary()}; shared with other work.",
        f"- Load average (1 / 5 / 15 min): {format_load(before)} at the start, "
        f"{format_load(after)} at the end.",
    ]


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]]
) -> list[str]:
    """Return the lines of a markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def now() -> datetime:
    return datetime.now(UTC)


def plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def new_figure(
    title: str, xlabel: str, ylabel: str, *, xlog: bool = False, ylog: bool = False
):
    """Return (figure, axes) with the Agg backend, or None without matplotlib."""
    if not plot_available():
        logger.warning(
            "matplotlib is not installed, so no plot is drawn: pip install -r bench/requirements.txt"
        )
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=100)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if xlog:
        axes.set_xscale("log", base=2)
    if ylog:
        axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    return figure, axes


def save_figure(args: argparse.Namespace, figure: Any, name: str) -> Path:
    import matplotlib.pyplot as plt

    args.plots_dir.mkdir(parents=True, exist_ok=True)
    path = args.plots_dir / f"{name}.png"
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def shell_join(command: Sequence[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)
