"""Simulated node agents for bench_heartbeat.py: websockets only, no torch.

Each simulated agent opens the agent websocket with its node token, sends
``hello`` with no models and no datasets, and waits for ``welcome``. It then
sends a ``heartbeat`` every ``heartbeat_interval`` seconds (from welcome) at
its own random phase, as a real agent does. The process writes
its progress to --status-file as JSON (connected, failed, CPU seconds) about
once a second, and closes every socket and exits on SIGTERM.

    python bench/fake_agents.py --gateway ws://127.0.0.1:8000/ws/agent/ \\
        --tokens-file tokens.json --status-file status.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import resource
import signal
import time
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 * 1024 * 1024


def hello_message(name: str) -> str:
    return json.dumps(
        {
            "type": "hello",
            "protocol": PROTOCOL_VERSION,
            "agent_version": "bench-fake",
            "name": name,
            "capabilities": {
                "torch": "none",
                "cpu_count": 1,
                "memory_bytes": 0,
                "device": "cpu",
            },
            "concurrency": 1,
            "models": [],
            "datasets": [],
        }
    )


class Fleet:
    """All simulated agents of this process and their counters."""

    def __init__(
        self,
        url: str,
        tokens: list[tuple[str, str]],
        connect_limit: int,
        connect_rate: float,
    ) -> None:
        self.url = url
        self.tokens = tokens
        self.connect_slots = asyncio.Semaphore(connect_limit)
        self.connect_rate = connect_rate
        self.started = time.monotonic()
        self.connections: list[ClientConnection] = []
        # Agents welcomed so far, and those of them whose socket closed later.
        self.welcomed = 0
        self.dropped = 0
        self.failed = 0
        self.heartbeats = 0
        self.errors: list[str] = []
        self.connect_seconds: float | None = None
        self.stopping = asyncio.Event()

    async def run_agent(self, index: int, name: str, token: str) -> None:
        # Agent i starts its handshake i / connect_rate seconds in.
        await asyncio.sleep(
            max(0.0, self.started + index / self.connect_rate - time.monotonic())
        )
        async with self.connect_slots:
            try:
                websocket = await connect(
                    self.url,
                    additional_headers={"Authorization": f"Bearer {token}"},
                    max_size=MAX_FRAME_BYTES,
                    compression=None,
                    open_timeout=120,
                    ping_interval=None,
                )
                await websocket.send(hello_message(name))
                interval = await self._await_welcome(websocket)
            except (OSError, TimeoutError, WebSocketException, ValueError) as exc:
                self.failed += 1
                if len(self.errors) < 5:
                    self.errors.append(f"{name}: {exc!r}")
                return
        self.connections.append(websocket)
        self.welcomed += 1
        await self._beat(websocket, interval)

    async def _await_welcome(self, websocket: ClientConnection) -> float:
        while True:
            message = json.loads(await asyncio.wait_for(websocket.recv(), 120))
            if message.get("type") == "welcome":
                return float(message["heartbeat_interval"])
            if message.get("type") == "error":
                raise ValueError(f"gateway error: {message.get('message')}")

    async def _beat(self, websocket: ClientConnection, interval: float) -> None:
        # A random phase spreads the heartbeats evenly, as independent agents would.
        next_at = time.monotonic() + random.uniform(0, interval)
        sequence = 0
        while not self.stopping.is_set():
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            sequence += 1
            beat = {
                "type": "heartbeat",
                "seq": sequence,
                "in_flight": 0,
                "sent_at": time.time(),
            }
            try:
                await websocket.send(json.dumps(beat))
            except WebSocketException:
                self.dropped += 1
                return
            self.heartbeats += 1
            next_at += interval

    async def close_all(self) -> None:
        self.stopping.set()
        slots = asyncio.Semaphore(200)

        async def close(websocket: ClientConnection) -> None:
            async with slots:
                try:
                    await asyncio.wait_for(websocket.close(), 10)
                except (TimeoutError, WebSocketException, OSError):
                    pass

        await asyncio.gather(*(close(websocket) for websocket in self.connections))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main_async(args: argparse.Namespace) -> None:
    tokens = [tuple(pair) for pair in json.loads(args.tokens_file.read_text())]
    fleet = Fleet(args.gateway, tokens, args.connect_limit, args.connect_rate)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    started = time.monotonic()
    tasks = [
        asyncio.create_task(fleet.run_agent(index, name, token))
        for index, (name, token) in enumerate(tokens)
    ]

    def write_status() -> None:
        if fleet.connect_seconds is None and fleet.welcomed + fleet.failed >= len(
            tokens
        ):
            fleet.connect_seconds = time.monotonic() - started
        status = {
            "agents": len(tokens),
            "connected": fleet.welcomed - fleet.dropped,
            "welcomed": fleet.welcomed,
            "dropped": fleet.dropped,
            "failed": fleet.failed,
            "heartbeats": fleet.heartbeats,
            "connect_seconds": fleet.connect_seconds,
            "cpu_seconds": cpu_seconds(),
            "errors": fleet.errors,
        }
        temporary = args.status_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(status))
        temporary.replace(args.status_file)

    while not stop.is_set():
        write_status()
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass
    await fleet.close_all()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    write_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--gateway",
        required=True,
        help="the agent websocket URL, ws://127.0.0.1:PORT/ws/agent/",
    )
    parser.add_argument(
        "--tokens-file",
        type=Path,
        required=True,
        help="JSON list of [node name, node token]",
    )
    parser.add_argument(
        "--status-file",
        type=Path,
        required=True,
        help="JSON file this process writes its progress to",
    )
    parser.add_argument(
        "--connect-limit",
        type=int,
        default=50,
        help="handshakes under way at once (default: 50)",
    )
    parser.add_argument(
        "--connect-rate",
        type=float,
        default=100.0,
        help="handshakes started per second at most (default: 100)",
    )
    args = parser.parse_args()
    if not args.gateway.startswith(("ws://127.", "ws://localhost", "ws://[::1]")):
        parser.error(
            "--gateway must be a loopback address; the benchmarks send traffic only to loopback"
        )
    logging.basicConfig(level=logging.WARNING)
    try:
        import uvloop

        uvloop.run(main_async(args))
    except ImportError:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
