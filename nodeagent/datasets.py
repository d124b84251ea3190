"""Datasets held on this node: manifests, header scans and the catalog.

Each dataset is two files in ``<data-dir>/datasets/``: ``<name>.safetensors``
with the tensors and ``<name>.json`` with the manifest::

    {"name": "digits-test-1", "tags": ["digits", "test"],
     "description": "...", "label_tensor": "labels"}

A scan reads each manifest and only the header of its safetensors file, never
the tensors, so it stays fast for datasets of any size. The agent reports the
metadata to the gateway; the rows stay here and are read only to run a model
(nodeagent.dataset_jobs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridproto.datasets import (
    MAX_DESCRIPTION,
    MAX_TAGS,
    MAX_TENSORS,
    NAME_RULE,
    TAG_RULE,
    is_name,
    normalize_tag,
)
from gridproto.tensors import (
    MAX_HEADER_BYTES,
    TensorFormatError,
    TensorInfo,
    read_tensor_infos,
)

logger = logging.getLogger(__name__)

# The gateway rejects control messages over 1 MiB. 256 datasets of 16 tensors
# and a 1,000-character description each stay well under it.
MAX_DATASETS = 256
MANIFEST_MAX_BYTES = 64 * 1024
INTEGER_DTYPES = {"int64", "int32", "int16", "int8", "uint8"}


class ManifestError(ValueError):
    """A dataset that cannot be offered. The message names the file and the fix."""


@dataclass(frozen=True)
class Dataset:
    """One dataset as scanned: its metadata and the path of its tensors."""

    name: str
    tags: tuple[str, ...]
    description: str
    tensors: dict[str, TensorInfo]
    rows: int
    label_tensor: str
    # Whether a request may get the model's raw outputs, not only argmax
    # classes or a summary. A model's outputs can copy its inputs, so this is
    # off unless the manifest sets "allow_raw_outputs": true.
    allow_raw_outputs: bool
    path: Path

    def report(self) -> dict[str, Any]:
        """Return the metadata sent to the gateway, which contains no row data."""
        return {
            "name": self.name,
            "tags": list(self.tags),
            "description": self.description,
            "tensors": {
                name: {"dtype": info.dtype, "shape": list(info.shape)}
                for name, info in sorted(self.tensors.items())
            },
            "rows": self.rows,
            "label_tensor": self.label_tensor,
        }


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Return the tensors of a safetensors file, reading only its header.

    Raises ManifestError when the file is missing or is not safetensors.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise ManifestError(f"{path} is not safetensors: it has fewer than 8 bytes")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise ManifestError(
                    f"{path} is not safetensors or its header is over "
                    f"{MAX_HEADER_BYTES} bytes: header length {length}"
                )
            header = prefix + file.read(length)
    except FileNotFoundError:
        raise ManifestError(
            f"data file {path} is missing; put the tensors there or remove the manifest"
        ) from None
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from None
    try:
        return read_tensor_infos(header, total_size=size)
    except TensorFormatError as exc:
        raise ManifestError(f"{path}: {exc}") from None


def _field(manifest: dict[str, Any], name: str, kind: type, default: Any, where: Path) -> Any:
    value = manifest.get(name, default)
    if not isinstance(value, kind):
        raise ManifestError(f"{where}: {name!r} must be {kind.__name__}, got {value!r}")
    return value


def _tags(raw: Any, where: Path) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        raise ManifestError(f'{where}: "tags" must be a non-empty list such as ["digits", "test"]')
    if len(raw) > MAX_TAGS:
        raise ManifestError(f'{where}: "tags" has {len(raw)} tags; the maximum is {MAX_TAGS}')
    tags: list[str] = []
    for value in raw:
        tag = normalize_tag(value)
        if tag is None:
            raise ManifestError(f"{where}: tag {value!r} is invalid; tags are {TAG_RULE}")
        if tag not in tags:
            tags.append(tag)
    return tuple(tags)


def _rows(tensors: dict[str, TensorInfo], data_path: Path) -> int:
    """Return the row count shared by every tensor at dimension 0."""
    if not tensors:
        raise ManifestError(f"{data_path} contains no tensors")
    if len(tensors) > MAX_TENSORS:
        raise ManifestError(f"{data_path} contains {len(tensors)} tensors; the maximum is {MAX_TENSORS}")
    counts = {name: info.shape[0] if info.shape else None for name, info in tensors.items()}
    scalar = [name for name, count in counts.items() if count is None]
    if scalar:
        raise ManifestError(f"{data_path}: tensor {scalar[0]!r} is a scalar; every tensor needs rows at dimension 0")
    if len(set(counts.values())) != 1:
        listed = ", ".join(f"{name}: {count}" for name, count in sorted(counts.items()))
        raise ManifestError(f"{data_path}: tensors have different row counts at dimension 0 ({listed})")
    rows = next(iter(counts.values()))
    if rows == 0:
        raise ManifestError(f"{data_path} has no rows")
    return rows


def _label_tensor(raw: Any, tensors: dict[str, TensorInfo], where: Path) -> str:
    if raw is None or raw == "":
        return ""
    if not isinstance(raw, str) or raw not in tensors:
        raise ManifestError(
            f'{where}: "label_tensor" {raw!r} is not a tensor of the dataset; '
            f"it has {', '.join(sorted(tensors))}"
        )
    info = tensors[raw]
    if len(info.shape) != 1 or info.dtype not in INTEGER_DTYPES:
        raise ManifestError(
            f"{where}: label tensor {raw!r} must hold one integer class per row, "
            f"got dtype {info.dtype} and shape {list(info.shape)}"
        )
    return raw


def load_manifest(manifest_path: Path) -> Dataset:
    """Read and check one manifest and the header of its data file.

    Raises ManifestError naming the file, the field and the fix.
    """
    stem = manifest_path.stem
    if not is_name(stem):
        raise ManifestError(f"{manifest_path}: dataset file names must be {NAME_RULE}")
    try:
        if manifest_path.stat().st_size > MANIFEST_MAX_BYTES:
            raise ManifestError(f"{manifest_path} is over {MANIFEST_MAX_BYTES} bytes")
        manifest = json.loads(manifest_path.read_bytes())
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read {manifest_path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{manifest_path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{manifest_path} must contain a JSON object")

    name = manifest.get("name")
    if name != stem:
        raise ManifestError(
            f'{manifest_path}: "name" must be {stem!r}, the file name without .json, got {name!r}'
        )
    tags = _tags(manifest.get("tags"), manifest_path)
    description = _field(manifest, "description", str, "", manifest_path)
    if len(description) > MAX_DESCRIPTION:
        raise ManifestError(f'{manifest_path}: "description" is over {MAX_DESCRIPTION} characters')
    allow_raw = _field(manifest, "allow_raw_outputs", bool, False, manifest_path)

    data_path = manifest_path.with_suffix(".safetensors")
    tensors = read_header(data_path)
    rows = _rows(tensors, data_path)
    label = _label_tensor(manifest.get("label_tensor"), tensors, manifest_path)
    return Dataset(
        name=name,
        tags=tags,
        description=description,
        tensors=tensors,
        rows=rows,
        label_tensor=label,
        allow_raw_outputs=allow_raw,
        path=data_path,
    )


def scan_datasets(directory: Path) -> dict[str, Dataset]:
    """Load every valid manifest in ``directory``; log and skip the others.

    Blocks on file reads, so the agent runs it in a thread.
    """
    if not directory.is_dir():
        return {}
    found: dict[str, Dataset] = {}
    for manifest_path in sorted(directory.glob("*.json")):
        try:
            dataset = load_manifest(manifest_path)
        except ManifestError as exc:
            logger.error("skipping dataset %s: %s", manifest_path.stem, exc)
            continue
        if len(found) >= MAX_DATASETS:
            logger.error(
                "skipping dataset %s: the node offers at most %d datasets",
                dataset.name,
                MAX_DATASETS,
            )
            continue
        found[dataset.name] = dataset
    for data_path in sorted(directory.glob("*.safetensors")):
        if data_path.stem not in found and not data_path.with_suffix(".json").exists():
            logger.warning(
                "skipping %s: it has no manifest %s", data_path, data_path.with_suffix(".json").name
            )
    return found


OnChange = Callable[[], Awaitable[None]]


class DatasetCatalog:
    """The datasets this node offers, rescanned on demand and on an interval.

    Used on the event loop only; scans run in a worker thread.
    """

    def __init__(self, data_dir: Path) -> None:
        self.directory = data_dir / "datasets"
        self._datasets: dict[str, Dataset] = {}
        self._wake = asyncio.Event()

    def get(self, name: str) -> Dataset | None:
        return self._datasets.get(name)

    def reports(self) -> list[dict[str, Any]]:
        return [dataset.report() for _, dataset in sorted(self._datasets.items())]

    def message(self) -> dict[str, Any]:
        return {"type": "datasets", "datasets": self.reports()}

    async def refresh(self) -> bool:
        """Rescan the directory; return True when the reported metadata changed."""
        before = self.reports()
        self._datasets = await asyncio.to_thread(scan_datasets, self.directory)
        changed = self.reports() != before
        if changed:
            logger.info(
                "offering %d datasets from %s: %s",
                len(self._datasets),
                self.directory,
                ", ".join(sorted(self._datasets)) or "none",
            )
        return changed

    def request_rescan(self) -> None:
        """Wake ``watch`` for a rescan now. Safe to call from a signal handler."""
        self._wake.set()

    async def watch(self, interval: float, on_change: OnChange) -> None:
        """Rescan every ``interval`` seconds (never when 0) and on ``request_rescan``.

        Calls ``on_change`` after each rescan that changed the metadata.
        """
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=interval or None)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                changed = await self.refresh()
            except Exception:
                # A bug in one scan must not stop later ones.
                logger.exception("rescanning datasets in %s failed", self.directory)
                continue
            if changed:
                await on_change()
