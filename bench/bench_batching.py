"""Measure the node agent's dynamic batching: throughput with batching off and on.

Starts one grid-node process per setting (batching off, and each window in
--windows), all connected to a minimal fake gateway in this script on
127.0.0.1. The processes start together and are then driven one at a time,
in interleaved rounds, so that a change in the machine's load during the run
falls on every setting alike. Each round measures:

- throughput: --clients concurrent clients, each sending one-row requests for
  the demo's DigitsCNN back to back for --seconds;
- latency: one client sending --latency-requests requests one after another.

The model is DigitsCNN with random weights (seed 0): training would not
change its cost. The table goes to stdout and to --output.

    .venv/bin/python bench/bench_batching.py
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import models
import safetensors.torch
import torch
from websockets.asyncio.server import ServerConnection, serve

from gridproto import PROTOCOL_VERSION
from gridproto.frames import decode_frame, encode_frame
from nodeagent.config import DEFAULT_BATCH_WINDOW_MS
from nodeagent.models import hash_file

TOKEN = "bench-node-token"
MAX_FRAME_BYTES = 64 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
START_SECONDS = 120.0
REQUEST_SECONDS = 30.0


def export_digits_cnn(path: Path) -> str:
    """Export DigitsCNN with a dynamic batch dim to ``path`` and return its SHA-256.

    bench/models.py exports the same program (seed 0, batch up to 4096) and
    keeps it between runs, which saves the smoke run a second of CPU.
    """
    archive, _ = models.cached("digits", models.export_digits)
    path.write_bytes(archive)
    return hash_file(path)


@dataclass
class AgentLink:
    """The fake gateway's side of one agent connection."""

    websocket: ServerConnection
    name: str
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    pending: dict[str, asyncio.Future[dict]] = field(default_factory=dict)
    job_ids: itertools.count = field(default_factory=itertools.count)

    async def infer(self, sha256: str, body: bytes) -> dict:
        """Send one infer.request and return the header of its reply."""
        job_id = f"{self.name}-{next(self.job_ids)}"
        future: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        self.pending[job_id] = future
        header = {
            "type": "infer.request",
            "job_id": job_id,
            "attempt": 1,
            "sha256": sha256,
            "timeout": REQUEST_SECONDS,
        }
        await self.websocket.send(encode_frame(header, body))
        return await asyncio.wait_for(future, REQUEST_SECONDS)

    def resolve(self, header: dict, body: bytes | None) -> None:
        future = self.pending.pop(header.get("job_id"), None)
        if future is not None and not future.done():
            future.set_result({**header, "body": body})


class FakeGateway:
    """Accepts agents on 127.0.0.1, welcomes them and routes replies by job id."""

    def __init__(self) -> None:
        self.links: dict[str, AgentLink] = {}
        self.connected = asyncio.Condition()
        self.url = ""

    async def start(self) -> None:
        self._server = await serve(
            self._handle, "127.0.0.1", 0, max_size=MAX_FRAME_BYTES, compression=None
        )
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def wait_for(self, names: list[str]) -> list[AgentLink]:
        async with self.connected:
            await asyncio.wait_for(
                self.connected.wait_for(lambda: all(n in self.links for n in names)),
                START_SECONDS,
            )
        return [self.links[name] for name in names]

    async def _handle(self, websocket: ServerConnection) -> None:
        hello = json.loads(await websocket.recv())
        welcome = {
            "type": "welcome",
            "protocol": PROTOCOL_VERSION,
            "node_id": len(self.links) + 1,
            "heartbeat_interval": 2.0,
            "max_frame_bytes": MAX_FRAME_BYTES,
        }
        await websocket.send(json.dumps(welcome))
        link = AgentLink(websocket=websocket, name=hello["name"])
        async with self.connected:
            self.links[link.name] = link
            self.connected.notify_all()
        async for data in websocket:
            if isinstance(data, bytes):
                header, body = decode_frame(data)
                link.resolve(header, bytes(body))
                continue
            message = json.loads(data)
            if message["type"] == "model.ready":
                link.ready.set()
            elif message["type"] == "infer.error":
                link.resolve(message, None)
            elif message["type"] == "model.failed":
                raise RuntimeError(f"agent {link.name}: {message['error']}")


async def place_model(link: AgentLink, path: Path, sha256: str) -> None:
    data = path.read_bytes()
    offer = {
        "type": "model.offer",
        "sha256": sha256,
        "size": len(data),
        "model_id": "digits",
    }
    await link.websocket.send(json.dumps(offer))
    offsets = range(0, len(data), CHUNK_BYTES)
    for offset in offsets:
        header = {
            "type": "model.chunk",
            "sha256": sha256,
            "offset": offset,
            "final": offset == offsets[-1],
        }
        await link.websocket.send(
            encode_frame(header, data[offset : offset + CHUNK_BYTES])
        )
    await asyncio.wait_for(link.ready.wait(), START_SECONDS)


async def start_agent(
    name: str, window_ms: int, gateway_url: str, workdir: Path, concurrency: int
) -> asyncio.subprocess.Process:
    environ = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "GRID_NODE_TOKEN": TOKEN,
        "GRID_GATEWAY": gateway_url,
        "GRID_BATCH_WINDOW_MS": str(window_ms),
        "GRID_CONCURRENCY": str(concurrency),
        "GRID_LOG_LEVEL": "WARNING",
    }
    log = (workdir / f"{name}.log").open("wb")
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nodeagent",
        "--name",
        name,
        "--data-dir",
        str(workdir / name),
        env=environ,
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
    )


async def measure_throughput(
    link: AgentLink, sha256: str, bodies: list[bytes], clients: int, seconds: float
) -> tuple[float, int]:
    """Return (requests per second, failed requests) for ``clients`` closed loops."""
    done = 0
    failed = 0
    stop_at = time.perf_counter() + seconds

    async def client(offset: int) -> None:
        nonlocal done, failed
        for index in itertools.count(offset):
            if time.perf_counter() >= stop_at:
                return
            reply = await link.infer(sha256, bodies[index % len(bodies)])
            if reply["type"] == "infer.result":
                done += 1
            else:
                failed += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(offset) for offset in range(clients)))
    return done / (time.perf_counter() - started), failed


async def measure_latency(
    link: AgentLink, sha256: str, bodies: list[bytes], count: int
) -> list[float]:
    """Return the round-trip time in ms of ``count`` requests sent one at a time."""
    times = []
    for index in range(count):
        started = time.perf_counter()
        await link.infer(sha256, bodies[index % len(bodies)])
        times.append((time.perf_counter() - started) * 1000)
    return times


async def compare_outputs(
    links: dict[str, AgentLink], sha256: str, bodies: list[bytes]
) -> float:
    """Return the largest output difference from the unbatched agent.

    All ``bodies`` are sent to each agent at once, so a batching agent runs
    them in batches.
    """
    outputs = {}
    for name, link in links.items():
        replies = await asyncio.gather(*(link.infer(sha256, body) for body in bodies))
        outputs[name] = [
            safetensors.torch.load(reply["body"])["output"] for reply in replies
        ]
    return max(
        (output - reference).abs().max().item()
        for name in links
        for output, reference in zip(outputs[name], outputs["off"])
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def render(
    args: argparse.Namespace,
    settings: list[tuple[str, int]],
    throughput: dict[str, list[float]],
    latency: dict[str, list[float]],
    failures: int,
    difference: float,
    loads: tuple[tuple[float, ...], tuple[float, ...]],
) -> str:
    off_latency = statistics.median(latency["off"])
    header = (
        "| batching | throughput, req/s (median of rounds) | each round | vs off "
        "| latency p50, ms | p90, ms | p50 vs off |"
    )
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, window in settings:
        rate = statistics.median(throughput[name])
        # Each round's rate over the off rate of the same round, so that load
        # that changes between rounds cancels out.
        ratio = statistics.median(
            value / off for value, off in zip(throughput[name], throughput["off"])
        )
        p50 = statistics.median(latency[name])
        label = "off" if window == 0 else f"{window} ms window"
        rounds = ", ".join(f"{value:.0f}" for value in throughput[name])
        lines.append(
            f"| {label} | {rate:.0f} | {rounds} | {ratio:.2f}x | {p50:.2f} | "
            f"{percentile(latency[name], 0.9):.2f} | {p50 / off_latency:.2f}x |"
        )
    table = "\n".join(lines)
    before, after = loads
    return f"""# Dynamic batching in the node agent

Written by `.venv/bin/python bench/bench_batching.py{" --smoke" if args.smoke else ""}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.

- Machine: {platform.machine()}, {os.cpu_count()} CPUs ({_cpu_model()}), shared
  with other work: load average {before[0]:.2f} / {before[1]:.2f} / {before[2]:.2f}
  at the start and {after[0]:.2f} / {after[1]:.2f} / {after[2]:.2f} at the end.
- Python {platform.python_version()}, torch {torch.__version__}. The agent's
  default window (GRID_BATCH_WINDOW_MS) is {DEFAULT_BATCH_WINDOW_MS} ms.
- Model: demo/digits.py DigitsCNN (random weights, seed 0), exported with a
  dynamic batch dim; each request is one 1x8x8 image (float32).
- Each setting is its own grid-node process (GRID_CONCURRENCY={args.concurrency},
  1 torch thread), driven through a fake gateway in the same script on
  127.0.0.1, which also runs the clients on the same CPUs.
- Throughput: {args.clients} concurrent clients, each sending its next request as
  soon as the previous one is answered, for {args.seconds:g} s; {args.rounds}
  interleaved rounds, the order of settings rotated each round. "vs off" is
  the median over rounds of the setting's rate over the off rate of that round.
- Latency: one client, {args.latency_requests} requests one after another, each
  round (p50 and p90 over all rounds).
- Failed requests: {failures}. Largest output difference from the unbatched
  agent, over 64 requests sent at once to each agent: {difference:.2e}.

{table}

![Throughput by batch window](../../docs/benchmarks/batching.png)
"""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


async def run(args: argparse.Namespace) -> str:
    windows = [int(value) for value in args.windows.split(",") if value.strip()]
    settings = [("off", 0), *((f"window-{w}ms", w) for w in windows)]
    names = [name for name, _ in settings]
    loads_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="grid-bench-") as tmp:
        workdir = Path(tmp)
        archive = workdir / "digits.pt2"
        sha256 = export_digits_cnn(archive)
        gateway = FakeGateway()
        await gateway.start()
        processes = [
            await start_agent(name, window, gateway.url, workdir, args.concurrency)
            for name, window in settings
        ]
        try:
            links = dict(zip(names, await gateway.wait_for(names)))
            for link in links.values():
                await place_model(link, archive, sha256)

            torch.manual_seed(1)
            bodies = [
                safetensors.torch.save({"images": torch.rand(1, 1, 8, 8)})
                for _ in range(64)
            ]
            difference = await compare_outputs(links, sha256, bodies)
            for name, link in links.items():
                await measure_throughput(link, sha256, bodies, args.clients, 1.0)

            throughput: dict[str, list[float]] = {name: [] for name in names}
            latency: dict[str, list[float]] = {name: [] for name in names}
            failures = 0
            for round_index in range(args.rounds):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    rate, failed = await measure_throughput(
                        links[name], sha256, bodies, args.clients, args.seconds
                    )
                    throughput[name].append(rate)
                    failures += failed
                    latency[name] += await measure_latency(
                        links[name], sha256, bodies, args.latency_requests
                    )
                    print(
                        f"round {round_index + 1}: {name}: {rate:.0f} req/s, "
                        f"latency p50 {statistics.median(latency[name]):.2f} ms",
                        file=sys.stderr,
                    )
        finally:
            for process in processes:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                await asyncio.wait_for(process.wait(), START_SECONDS)
            await gateway.stop()

    return render(
        args,
        settings,
        throughput,
        latency,
        failures,
        difference,
        (loads_before, os.getloadavg()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--clients", type=int, default=32, help="concurrent clients (default: 32)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=3.0,
        help="seconds per throughput run (default: 3)",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds (default: 5)"
    )
    parser.add_argument(
        "--latency-requests",
        type=int,
        default=100,
        help="sequential requests per round for latency (default: 100)",
    )
    parser.add_argument(
        "--windows",
        default="1,2,5",
        help="comma-separated batch windows in ms, besides off (default: 1,2,5)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=2,
        help="GRID_CONCURRENCY of each agent (default: 2)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="markdown file for the table (default: batching.md in --results-dir)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="one short round with batching off only, to check that the script works (seconds)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=REPO / "bench" / "results",
        help="folder for the table (default: bench/results)",
    )
    parser.add_argument(
        "--plots-dir",
        type=Path,
        default=REPO / "docs" / "benchmarks",
        help="folder for the PNG plot (default: docs/benchmarks)",
    )
    args = parser.parse_args()
    # SystemExit on SIGTERM runs the finally block that stops the agents.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    if args.smoke:
        args.clients, args.seconds, args.rounds = 4, 0.5, 1
        args.latency_requests, args.windows = 10, ""
    output = args.output or args.results_dir / "batching.md"

    report = asyncio.run(run(args))
    print(report)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    plot(report, args.plots_dir / "batching.png")


def plot(report: str, path: Path) -> None:
    """Draw the table's median throughput per setting as bars, when matplotlib is installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed, so no plot is drawn: pip install -r bench/requirements.txt", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [line.split("|")[1:-1] for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    labels = [cells[0].strip() for cells in rows[1:]]
    rates = [float(cells[1]) for cells in rows[1:]]
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=100)
    axes.bar(labels, rates, color="tab:blue")
    axes.set_title("One agent: throughput by batch window")
    axes.set_ylabel("requests/s (median of rounds)")
    axes.grid(True, axis="y", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    main()
