"""grid-node as a real process against a fake gateway on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from http import HTTPStatus
from pathlib import Path

from nodeagent.cli import EXIT_OK, EXIT_TOKEN_REJECTED
from nodeagent.testing import FakeGateway

REPO = Path(__file__).resolve().parents[1]
TOKEN = "node-secret-token-4f1c"
# Importing torch takes a few seconds in a fresh process.
PROCESS_SECONDS = 60


async def start_agent(gateway: FakeGateway, data_dir: Path, *options: str):
    environ = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "GRID_NODE_TOKEN": TOKEN,
        "GRID_GATEWAY": gateway.url,
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nodeagent",
        "--data-dir",
        str(data_dir),
        "--name",
        "node-cli",
        *options,
        env=environ,
        cwd=REPO,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_token_rejected_exits_3(tmp_path):
    async with FakeGateway(reject_status=HTTPStatus.FORBIDDEN) as gateway:
        process = await start_agent(gateway, tmp_path)
        _, stderr = await asyncio.wait_for(process.communicate(), PROCESS_SECONDS)

    log = stderr.decode()
    assert process.returncode == EXIT_TOKEN_REJECTED
    assert "rejected the node token with HTTP 403" in log
    assert "the token is invalid or revoked" in log
    assert len(gateway.request_headers) == 1
    assert TOKEN not in log


async def test_sigterm_sends_bye(tmp_path):
    async with FakeGateway() as gateway:
        process = await start_agent(gateway, tmp_path, "--log-level", "DEBUG")
        session = await gateway.next_session(timeout=PROCESS_SECONDS)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), PROCESS_SECONDS)
        bye = await session.receive()
        close_code = await session.wait_closed()

    log = stderr.decode()
    assert process.returncode == EXIT_OK
    assert session.hello["name"] == "node-cli"
    assert bye == {"type": "bye", "reason": "shutting down"}
    assert close_code == 1000
    assert "received SIGTERM, stopping" in log
    assert TOKEN not in log
