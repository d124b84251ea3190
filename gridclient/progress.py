"""Progress bars on the terminal, and an upload body that reports its progress.

Bars go to stderr through rich and only when stderr is a terminal, so logs and
CI output stay free of control codes. Diagnostics go through logging instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Self

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

UPLOAD_CHUNK_BYTES = 256 * 1024


class Reporter:
    """A rich Progress that does nothing when disabled or not on a terminal.

    Use it as a context manager. Task ids from a disabled reporter are None,
    and every method accepts them.
    """

    def __init__(self, enabled: bool) -> None:
        console = Console(stderr=True)
        self._progress: Progress | None = None
        if enabled and console.is_terminal:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=console,
            )

    def __enter__(self) -> Self:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def add_task(self, description: str, total: float | None) -> TaskID | None:
        if self._progress is None:
            return None
        return self._progress.add_task(description, total=total, detail="")

    def update(
        self,
        task: TaskID | None,
        *,
        completed: float | None = None,
        total: float | None = None,
        advance: float | None = None,
        detail: str | None = None,
    ) -> None:
        if self._progress is None or task is None:
            return
        fields = {} if detail is None else {"detail": detail}
        self._progress.update(
            task, completed=completed, total=total, advance=advance, **fields
        )


def format_size(size: int) -> str:
    """Format a byte count with a decimal unit, such as ``12.3 MB``."""
    value = float(size)
    for unit in ("B", "kB", "MB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


class ProgressStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A request body in memory that reports the bytes sent after each chunk.

    It works with both httpx.Client and httpx.AsyncClient. Every iteration
    starts from the first byte, so a retried request sends the whole body again
    and ``on_progress`` starts again from 0.
    """

    def __init__(
        self,
        body: bytes,
        on_progress: Callable[[int], None],
        chunk_bytes: int = UPLOAD_CHUNK_BYTES,
    ) -> None:
        self._body = memoryview(body)
        self._on_progress = on_progress
        self._chunk_bytes = chunk_bytes

    def __iter__(self) -> Iterator[bytes]:
        self._on_progress(0)
        for start in range(0, len(self._body), self._chunk_bytes):
            end = min(start + self._chunk_bytes, len(self._body))
            yield bytes(self._body[start:end])
            self._on_progress(end)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self:
            yield chunk
