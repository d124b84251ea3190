"""Model files on disk and the programs loaded from them.

Each held model is ``<data-dir>/models/<sha256>.pt2``. Transfers in progress
and temporary loadable copies live in ``models/.incoming/``.

Received bytes reach torch only through ``ModelStore.load_program``, after
``gridproto.pt2.check_archive`` has rejected every archive entry that torch
would unpickle. torch then loads a copy whose sample-input entry is emptied,
because torch unpickles that entry. Nothing here calls torch.load or pickle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gridproto.pt2 import ArchiveError, ArchiveInfo, check_archive, write_loadable_copy

logger = logging.getLogger(__name__)

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def is_sha256(value: object) -> bool:
    """Check for a lowercase hex SHA-256 digest, the only form used in file names."""
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ModelError(Exception):
    """A model that cannot be used. Its message is sent in ``model.failed``."""


@dataclass(frozen=True)
class LoadedModel:
    sha256: str
    size: int
    # User inputs of the program in call order, from the archive's signature.
    input_names: tuple[str, ...]
    module: torch.nn.Module


class ModelStore:
    """Held model files and the registry of programs loaded from them.

    The registry (``get``, ``add``, ``unload``, ``held``) is used only on the
    event loop. ``check``, ``install``, ``load_program``, ``scan`` and
    ``delete`` read or write files, so they block and run in a worker thread.
    They never touch the registry: the loop registers the models they return.
    """

    def __init__(self, data_dir: Path, *, max_model_bytes: int) -> None:
        self.directory = data_dir / "models"
        self.incoming = self.directory / ".incoming"
        self.max_model_bytes = max_model_bytes
        self._loaded: dict[str, LoadedModel] = {}

    def prepare(self) -> None:
        """Create the directories and delete files left by an interrupted run."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        for leftover in self.incoming.iterdir():
            if leftover.is_file():
                logger.info(
                    "deleting %s, left by an interrupted transfer or load", leftover
                )
                leftover.unlink()

    def path_for(self, sha256: str) -> Path:
        # The hash becomes a file name, so anything but 64 hex digits is rejected.
        if not is_sha256(sha256):
            raise ValueError(
                f"invalid sha256 {sha256!r}: expected 64 lowercase hex digits"
            )
        return self.directory / f"{sha256}.pt2"

    def part_path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError(
                f"invalid sha256 {sha256!r}: expected 64 lowercase hex digits"
            )
        return self.incoming / f"{sha256}.part"

    def get(self, sha256: str) -> LoadedModel | None:
        return self._loaded.get(sha256)

    def add(self, model: LoadedModel) -> None:
        self._loaded[model.sha256] = model

    def unload(self, sha256: str) -> LoadedModel | None:
        """Remove a model from the registry. Running requests keep its module."""
        return self._loaded.pop(sha256, None)

    def held(self) -> list[dict[str, Any]]:
        return [
            {"sha256": model.sha256, "size": model.size}
            for model in sorted(self._loaded.values(), key=lambda m: m.sha256)
        ]

    def delete(self, sha256: str) -> bool:
        """Delete a model's file and return whether it existed."""
        try:
            self.path_for(sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    def check(self, path: Path) -> ArchiveInfo:
        try:
            return check_archive(str(path), max_unpacked_bytes=self.max_model_bytes)
        except ArchiveError as exc:
            raise ModelError(str(exc)) from None

    def install(self, sha256: str, part: Path) -> LoadedModel:
        """Check a received file whose hash is verified, move it into place and load it.

        Deletes the file when any step fails.
        """
        final = self.path_for(sha256)
        try:
            info = self.check(part)
            os.replace(part, final)
            return self.load_program(sha256, final, info)
        except BaseException:
            part.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            raise

    def load_program(self, sha256: str, path: Path, info: ArchiveInfo) -> LoadedModel:
        """Load a checked archive through a copy with its sample inputs emptied."""
        size = path.stat().st_size
        fd, copy = tempfile.mkstemp(
            dir=self.incoming, prefix=f"{sha256}.", suffix=".pt2"
        )
        os.close(fd)
        try:
            write_loadable_copy(str(path), copy)
            module = torch.export.load(copy).module()
        except Exception as exc:
            # torch's deserializer can raise almost anything on a crafted archive
            # that passed the allowlist, so every error becomes model.failed.
            logger.exception(
                "model %s: torch could not load the checked archive", sha256
            )
            raise ModelError(
                f"the program could not be loaded: {type(exc).__name__}: {exc}"
            ) from None
        finally:
            Path(copy).unlink(missing_ok=True)
        return LoadedModel(
            sha256=sha256, size=size, input_names=tuple(info.input_names), module=module
        )

    def scan(self) -> list[LoadedModel]:
        """Verify and load every ``<sha256>.pt2`` in the models directory.

        A file whose content does not hash to its name, or that fails the check
        or the load, is deleted, so ``hello`` reports only usable models.
        """
        models = []
        for path in sorted(self.directory.glob("*.pt2")):
            sha256 = path.stem
            if not path.is_file() or not is_sha256(sha256):
                logger.warning("ignoring %s: model files are named <sha256>.pt2", path)
                continue
            try:
                digest = hash_file(path)
            except OSError as exc:
                logger.error("model %s: cannot read %s: %s", sha256, path, exc)
                continue
            if digest != sha256:
                logger.warning(
                    "model %s: deleting %s, which is corrupt because it hashes to %s",
                    sha256,
                    path,
                    digest,
                )
                path.unlink()
                continue
            try:
                model = self.load_program(sha256, path, self.check(path))
            except ModelError as exc:
                logger.error("model %s: deleting %s: %s", sha256, path, exc)
                path.unlink()
                continue
            logger.info("model %s: loaded from %s (%d bytes)", sha256, path, model.size)
            models.append(model)
        return models
