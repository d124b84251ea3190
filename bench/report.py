"""Assemble docs/benchmarks.md from the tables in bench/results/ and this machine's facts.

Each benchmark script writes bench/results/<name>.md and docs/benchmarks/<name>.png;
this script joins them in a fixed order, lists every target line, adds the
machine's CPU model, core count and memory, and the command that reproduces
each figure. A missing table is named with the command that makes it.
bench/results/analysis.md, when present, is included as written.

    .venv/bin/python bench/report.py
"""

from __future__ import annotations

import argparse
import re
from importlib import metadata
from pathlib import Path

import common

# (result name, script, section title) in page order.
SECTIONS = [
    ("overhead", "bench_overhead.py", "Overhead"),
    ("throughput", "bench_throughput.py", "Throughput"),
    ("peer", "bench_peer.py", "Peer (Ray Serve)"),
    ("failover", "bench_failover.py", "Failover"),
    ("heartbeat", "bench_heartbeat.py", "Heartbeat scale"),
    ("placement", "bench_placement.py", "Placement"),
    ("batching", "bench_batching.py", "Dynamic batching in the agent"),
]
# A verdict line: "- Target...: ... met." or "...: MISSED.", or one per signal.
TARGET_LINE = re.compile(
    r"^- (Target|SIGKILL|SIGSTOP)[^:]*:.*(: met\.|: MISSED\.|not measured).*$"
)


def demote(markdown: str) -> str:
    """Move every heading one level down and drop the page's own first heading."""
    lines = markdown.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(
        "#" + line if line.startswith("#") else line for line in lines
    ).strip()


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def render(results_dir: Path) -> str:
    machine = common.machine_summary()
    lines = [
        "# Benchmarks",
        "",
        "How close Grid is to the limit of this machine and to the system people would pick "
        "instead. Every figure comes from a script under `bench/` that starts its own Grid "
        "stack (gateway, Celery worker and beat, agents, PostgreSQL, Redis) on 127.0.0.1, "
        "drives it with a lean load generator (`bench/httpload.py`: raw keep-alive sockets on "
        "uvloop, whose own CPU is reported beside each figure) and writes its table here. "
        "`make bench` runs them all and rebuilds this page; `make bench PEER=1` first installs "
        "Ray Serve for the peer comparison.",
        "",
        f"- Machine: {machine}.",
        "- The machine is shared: other work ran during these runs, so each table gives the "
        "load average at its start and end, and each comparison runs both sides in the same "
        "run, interleaved, with ratios beside the absolute figures.",
        f"- Plots: matplotlib {package_version('matplotlib')}. Peer: ray {package_version('ray')}.",
        "- These are benchmarks, not tests: `tests/test_bench_smoke.py` runs each script with "
        "`--smoke` (tiny sizes, seconds) so that the scripts keep working.",
        "",
        "## Targets",
        "",
    ]
    pages = {}
    for name, script, _ in SECTIONS:
        path = results_dir / f"{name}.md"
        pages[name] = path.read_text() if path.exists() else None
    for name, script, title in SECTIONS:
        page = pages[name]
        if page is None:
            continue
        for line in page.splitlines():
            if TARGET_LINE.match(line):
                lines.append(f"- {title}: {line[2:]}")
    analysis = results_dir / "analysis.md"
    if analysis.exists():
        lines += ["", "## Where the time goes", "", demote(analysis.read_text())]
    for name, script, title in SECTIONS:
        lines += [
            "",
            f"## {title}",
            "",
            f"Reproduce: `{common.reproduce_command(script)}`",
            "",
        ]
        page = pages[name]
        if page is None:
            lines.append(
                f"Not run yet: `{common.reproduce_command(script)}` writes this table."
            )
            continue
        lines.append(demote(page).replace("../../docs/benchmarks/", "benchmarks/"))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=common.RESULTS_DIR,
        help="folder of the tables (default: bench/results)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=common.REPO / "docs" / "benchmarks.md",
        help="page to write (default: docs/benchmarks.md)",
    )
    args = parser.parse_args()
    args.output.write_text(render(args.results_dir))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
