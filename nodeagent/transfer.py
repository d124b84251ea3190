"""Receive one model file in chunks, checking offsets, size and SHA-256."""

from __future__ import annotations

import hashlib
from pathlib import Path


class TransferError(Exception):
    """A transfer that cannot complete. Its message is sent in ``model.failed``."""


class Transfer:
    """One ``model.offer`` and its chunks, written to ``<sha256>.part``.

    The hash is computed while writing, so the file is read only once more,
    by the archive check. ``write`` and ``finish`` block on disk I/O, so the
    agent calls them from a worker thread, one call at a time.
    """

    def __init__(self, *, sha256: str, size: int, path: Path) -> None:
        self.sha256 = sha256
        self.size = size
        self.path = path
        self.received = 0
        self._hash = hashlib.sha256()
        self._file = path.open("wb")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset != self.received:
            raise TransferError(
                f"chunk at offset {offset} does not follow the {self.received} bytes "
                "received so far"
            )
        if self.received + len(data) > self.size:
            raise TransferError(
                f"chunks run past the announced size of {self.size} bytes "
                f"(chunk at offset {offset} has {len(data)} bytes)"
            )
        self._file.write(data)
        self._hash.update(data)
        self.received += len(data)

    def finish(self) -> Path:
        """Close the file and return its path once the size and hash match the offer."""
        self._file.close()
        if self.received != self.size:
            raise TransferError(
                f"transfer ended after {self.received} bytes, but the offer announced "
                f"{self.size} bytes"
            )
        digest = self._hash.hexdigest()
        if digest != self.sha256:
            raise TransferError(f"sha256 mismatch: the received bytes hash to {digest}")
        return self.path

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)
