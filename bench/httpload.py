"""A lean HTTP/1.1 load generator for the benchmarks: keep-alive sockets, loopback only.

httpx spends about 2 ms of CPU per request, which on a 2-core machine takes
CPU from the server it measures. These clients build each request's bytes
once and parse only the status line and the body's length:

- ``SyncClient``: a blocking socket, one request at a time, for latency.
- ``closed_loop``: asyncio (on uvloop when installed) with N connections,
  each sending its next request as soon as the previous answer arrives.

Run as a script, it reads a JSON spec, runs ``closed_loop`` and writes a JSON
result with every request's start, latency and status, and the CPU time this
process used (``resource.getrusage``), so that the caller can report the
client's own CPU beside each figure. Timestamps are ``time.perf_counter()``,
which is CLOCK_MONOTONIC on Linux and so comparable across processes.

    python bench/httpload.py SPEC.json RESULT.json
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class HttpError(Exception):
    """A response that could not be parsed, or a connection that closed early."""


def build_request(
    host: str, port: int, path: str, body: bytes, headers: dict[str, str]
) -> bytes:
    """Return the bytes of one POST request with ``body``, for a keep-alive connection."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str]

    def attempts(self) -> int:
        """Return Grid's X-Grid-Attempts (nodes tried), 1 when absent."""
        try:
            return int(self.headers.get("x-grid-attempts", "1"))
        except ValueError:
            return 1


class ResponseParser:
    """Incremental parser of HTTP/1.1 responses with Content-Length or chunked bodies."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._status: int | None = None
        self._headers: dict[str, str] = {}
        self._length: int | None = None
        self._chunked = False

    def feed(self, data: bytes) -> list[Response]:
        self.buffer += data
        responses = []
        while True:
            response = self._next()
            if response is None:
                return responses
            responses.append(response)

    def _next(self) -> Response | None:
        if self._status is None and not self._read_head():
            return None
        if self._chunked:
            body = self._read_chunked()
            if body is None:
                return None
        else:
            assert self._length is not None
            if len(self.buffer) < self._length:
                return None
            body = bytes(self.buffer[: self._length])
            del self.buffer[: self._length]
        status, self._status = self._status, None
        assert status is not None
        return Response(status, body, self._headers)

    def _read_head(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[: end + 4]
        try:
            self._status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise HttpError(f"invalid status line {lines[0]!r}") from None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self._headers = headers
        self._chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        if not self._chunked:
            self._length = int(headers.get("content-length", "0"))
        return True

    def _read_chunked(self) -> bytes | None:
        # The whole body is parsed again on each call until it is complete;
        # the benchmarks' chunked bodies are small.
        position = 0
        body = bytearray()
        while True:
            line_end = self.buffer.find(b"\r\n", position)
            if line_end < 0:
                return None
            size = int(bytes(self.buffer[position:line_end]).split(b";")[0], 16)
            start = line_end + 2
            if size == 0:
                trailer_end = self.buffer.find(b"\r\n", start)
                if trailer_end < 0:
                    return None
                del self.buffer[: trailer_end + 2]
                return bytes(body)
            if len(self.buffer) < start + size + 2:
                return None
            body += self.buffer[start : start + size]
            position = start + size + 2


def check_loopback(host: str) -> None:
    if host not in LOOPBACK and not host.startswith("127."):
        raise ValueError(
            f"host {host!r} is not a loopback address; the benchmarks send traffic only to loopback"
        )


class SyncClient:
    """One blocking keep-alive connection; ``request`` sends prebuilt bytes."""

    def __init__(self, host: str, port: int, timeout: float = 120.0) -> None:
        check_loopback(host)
        self.address = (host, port)
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.parser = ResponseParser()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = ResponseParser()
        return sock

    def request(self, data: bytes) -> Response:
        if self.sock is None:
            self.sock = self._connect()
        try:
            self.sock.sendall(data)
            while True:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise HttpError("the server closed the connection")
                responses = self.parser.feed(chunk)
                if responses:
                    return responses[0]
        except (OSError, HttpError):
            self.close()
            raise

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = ResponseParser()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Response] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            responses = self.parser.feed(data)
        except HttpError as exc:
            self._fail(exc)
            return
        for response in responses:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(response)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(HttpError(f"connection lost: {exc}"))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    async def request(self, data: bytes, timeout: float) -> Response:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        timer = loop.call_later(
            timeout, self._fail, HttpError(f"no response within {timeout} s")
        )
        self.transport.write(data)
        try:
            return await self.waiter
        finally:
            timer.cancel()


async def closed_loop(
    host: str,
    port: int,
    requests: list[bytes],
    *,
    clients: int,
    seconds: float,
    timeout: float = 60.0,
    start_at: float | None = None,
) -> list[tuple[float, float, int, int]]:
    """Run ``clients`` closed loops for ``seconds``; return one record per request.

    A record is (start, latency in s, status, X-Grid-Attempts).
    Client ``i`` sends ``requests[(i + n) % len(requests)]`` as its n-th request.
    A request that fails at the connection level is recorded with status 0 and
    its client reconnects. ``start_at`` is a perf_counter time to wait for, so
    that all connections are open before the clock starts.
    """
    check_loopback(host)
    loop = asyncio.get_running_loop()
    connections = []
    for _ in range(clients):
        _, connection = await loop.create_connection(_Connection, host, port)
        connections.append(connection)
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    stop_at = time.perf_counter() + seconds
    records: list[tuple[float, float, int, int]] = []

    async def run_client(index: int) -> None:
        connection = connections[index]
        sent = 0
        while True:
            started = time.perf_counter()
            if started >= stop_at:
                return
            data = requests[(index + sent) % len(requests)]
            sent += 1
            try:
                response = await connection.request(data, timeout)
                status, attempts = response.status, response.attempts()
            except (HttpError, OSError):
                status, attempts = 0, 0
                try:
                    _, connection = await loop.create_connection(
                        _Connection, host, port
                    )
                except OSError:
                    await asyncio.sleep(0.05)
            records.append((started, time.perf_counter() - started, status, attempts))

    await asyncio.gather(*(run_client(index) for index in range(clients)))
    for connection in connections:
        if connection.transport is not None:
            connection.transport.close()
    return records


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the load that ``spec`` describes; see ``bench.common.LoadSpec``."""
    bodies = [Path(path).read_bytes() for path in spec["body_files"]]
    requests = [
        build_request(spec["host"], spec["port"], spec["path"], body, spec["headers"])
        for body in bodies
    ]
    try:
        import uvloop

        runner = uvloop.run
        loop_name = "uvloop"
    except ImportError:
        runner = asyncio.run
        loop_name = "asyncio"
    cpu_before = cpu_seconds()
    records = runner(
        closed_loop(
            spec["host"],
            spec["port"],
            requests,
            clients=spec["clients"],
            seconds=spec["seconds"],
            timeout=spec.get("timeout", 60.0),
            start_at=spec.get("start_at"),
        )
    )
    return {
        "records": records,
        "cpu_seconds": cpu_seconds() - cpu_before,
        "loop": loop_name,
    }


def main() -> None:
    spec_path, result_path = sys.argv[1:3]
    result = run_spec(json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
