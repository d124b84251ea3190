"""Test support: a fake gateway on 127.0.0.1 and small exported models.

The agent never imports this module. ``FakeGateway`` is a real websocket
server that plays the gateway side of protocol 1, so tests drive the agent
over a real connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from gridproto import PROTOCOL_VERSION
from gridproto.frames import decode_frame, encode_frame

if TYPE_CHECKING:
    from nodeagent.connection import Agent, Outcome

WAIT_SECONDS = 10.0
TOKEN = "node-secret-token"


def export_archive(module: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> bytes:
    """Export ``module`` with a dynamic batch dimension and return the .pt2 bytes."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        module, example, dynamic_shapes=tuple({0: batch} for _ in example)
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


class TwoInputs(torch.nn.Module):
    """Returns two outputs from inputs ``a`` (batch, 4) and ``b`` (batch, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.arange(8, dtype=torch.float32).reshape(4, 2)
        )

    def forward(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return a @ self.weight + b, a.sum(dim=1)


@functools.cache
def mlp() -> tuple[torch.nn.Module, bytes]:
    """Return a small MLP, taking ``input`` of shape (batch, 8), and its archive."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    ).eval()
    return module, export_archive(module, (torch.randn(4, 8),))


@functools.cache
def two_inputs() -> tuple[torch.nn.Module, bytes]:
    module = TwoInputs().eval()
    return module, export_archive(module, (torch.randn(3, 4), torch.randn(3, 2)))


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Heartbeat:
    message: dict[str, Any]
    received_at: float


@dataclass
class GatewaySession:
    """One agent connection, from the fake gateway's side."""

    websocket: ServerConnection
    hello: dict[str, Any]
    heartbeats: list[Heartbeat] = field(default_factory=list)
    # Every other message: a dict for text, a (header, body) pair for binary.
    messages: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            header, body = decode_frame(data)
            self.messages.put_nowait((header, bytes(body)))
            return
        message = json.loads(data)
        if message["type"] == "heartbeat":
            self.heartbeats.append(Heartbeat(message, time.monotonic()))
        else:
            self.messages.put_nowait(message)

    async def receive(self, timeout: float = WAIT_SECONDS) -> Any:
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.websocket.send(json.dumps(message))

    async def send_frame(self, header: dict[str, Any], body: bytes = b"") -> None:
        await self.websocket.send(encode_frame(header, body))

    async def send_model(
        self, data: bytes, *, sha256: str | None = None, chunk_bytes: int = 4096
    ) -> str:
        """Offer ``data`` as a model, stream it in chunks and return its hash."""
        sha256 = sha256 or sha256_of(data)
        await self.send_json(
            {
                "type": "model.offer",
                "sha256": sha256,
                "size": len(data),
                "model_id": "test",
            }
        )
        offsets = range(0, max(len(data), 1), chunk_bytes)
        for offset in offsets:
            await self.send_frame(
                {
                    "type": "model.chunk",
                    "sha256": sha256,
                    "offset": offset,
                    "final": offset == offsets[-1],
                },
                data[offset : offset + chunk_bytes],
            )
        return sha256

    async def infer(
        self,
        sha256: str,
        tensors: dict[str, torch.Tensor],
        *,
        job_id: str = "job-1",
        attempt: int = 1,
        timeout: float = 30.0,
    ) -> None:
        header = {
            "type": "infer.request",
            "job_id": job_id,
            "attempt": attempt,
            "sha256": sha256,
            "timeout": timeout,
        }
        await self.send_frame(header, safetensors.torch.save(tensors))

    async def wait_closed(self, timeout: float = WAIT_SECONDS) -> int | None:
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.websocket.close_code


class FakeGateway:
    """A websocket server on 127.0.0.1 that replies to ``hello`` with ``welcome``.

    ``reject_status`` makes every upgrade fail with that HTTP status instead.
    ``hello_reply``, when given, is sent in place of ``welcome``, and the
    connection is then closed with ``hello_close_code``.
    ``request_headers`` keeps the handshake headers of every attempt.
    """

    def __init__(
        self,
        *,
        heartbeat_interval: float = 0.2,
        max_frame_bytes: int = 64 * 1024 * 1024,
        reject_status: HTTPStatus | None = None,
        hello_reply: dict[str, Any] | None = None,
        hello_close_code: int = 4400,
    ) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.max_frame_bytes = max_frame_bytes
        self.reject_status = reject_status
        self.hello_reply = hello_reply
        self.hello_close_code = hello_close_code
        self.request_headers: list[Headers] = []
        self.request_paths: list[str] = []
        self.sessions: asyncio.Queue[GatewaySession] = asyncio.Queue()
        self.url = ""
        self.connections = 0
        self._server: Server | None = None

    async def __aenter__(self) -> FakeGateway:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            max_size=self.max_frame_bytes,
            compression=None,
        )
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def next_session(self, timeout: float = WAIT_SECONDS) -> GatewaySession:
        return await asyncio.wait_for(self.sessions.get(), timeout)

    def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        self.request_headers.append(request.headers)
        self.request_paths.append(request.path)
        if self.reject_status is not None:
            return connection.respond(self.reject_status, "node token rejected\n")
        return None

    async def _handle(self, websocket: ServerConnection) -> None:
        hello = json.loads(await websocket.recv())
        self.connections += 1
        if self.hello_reply is not None:
            await websocket.send(json.dumps(self.hello_reply))
            await websocket.close(self.hello_close_code, "rejected hello")
            return
        session = GatewaySession(websocket=websocket, hello=hello)
        await websocket.send(
            json.dumps(
                {
                    "type": "welcome",
                    "protocol": PROTOCOL_VERSION,
                    "node_id": self.connections,
                    "heartbeat_interval": self.heartbeat_interval,
                    "max_frame_bytes": self.max_frame_bytes,
                }
            )
        )
        await self.sessions.put(session)
        try:
            async for data in websocket:
                session.record(data)
        except ConnectionClosed:
            pass
        finally:
            session.closed.set()


def make_agent(gateway: FakeGateway, data_dir: Path, **settings: Any) -> Agent:
    """Return an agent for ``gateway`` that reconnects fast.

    ``settings`` are further AgentConfig fields, such as ``batch_window_ms``.
    """
    # Imported here, like Agent above, so that gateway-side tests can use this
    # module without importing the agent.
    from nodeagent.backoff import Backoff
    from nodeagent.config import AgentConfig, agent_endpoint
    from nodeagent.connection import Agent

    config = AgentConfig(
        endpoint=agent_endpoint(gateway.url),
        token=TOKEN,
        name="node-a",
        data_dir=data_dir,
        **settings,
    )
    return Agent(config, backoff=Backoff(base=0.05, cap=0.2))


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[Outcome]]:
    """Run ``agent`` in a task, then stop it on exit and wait for ``run`` to return."""
    task = asyncio.create_task(agent.run())
    try:
        yield task
    finally:
        agent.stop()
        await asyncio.wait_for(task, WAIT_SECONDS)
