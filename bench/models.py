"""The models the benchmarks serve, exported with torch.export as Grid serves them."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gridclient.export import program_signature, save_program


class RowSum(nn.Module):
    """Returns each row's sum: compute is trivial, so the input can be any size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1, keepdim=True)


class BigWeight(nn.Module):
    """Adds the first element of a large constant weight to the input."""

    def __init__(self, elements: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(elements), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight[:1]


def cached(
    name: str, export: Callable[[], tuple[bytes, list[dict[str, Any]]]]
) -> tuple[bytes, list[dict[str, Any]]]:
    """Return ``export()``'s archive and signature, kept in a temporary folder between runs.

    The first torch.export in a process costs more than a second of CPU, which
    the smoke runs would each pay. The folder's name includes torch's version,
    because an archive saved by one version may not load in another.
    """
    folder = (
        Path(tempfile.gettempdir()) / f"grid-bench-models-torch-{torch.__version__}"
    )
    archive_path, signature_path = folder / f"{name}.pt2", folder / f"{name}.json"
    try:
        return archive_path.read_bytes(), json.loads(signature_path.read_text())
    except (OSError, ValueError):
        pass
    archive, signature = export()
    folder.mkdir(parents=True, exist_ok=True)
    # Written under a unique name and renamed, so that a concurrent run never
    # reads half a file.
    for path, data in [
        (archive_path, archive),
        (signature_path, json.dumps(signature).encode()),
    ]:
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_bytes(data)
        partial.replace(path)
    return archive, signature


def export_row_sum() -> tuple[bytes, list[dict[str, Any]]]:
    """Export RowSum for float32 inputs [N, D] with both dims dynamic."""
    rows = torch.export.Dim("rows", min=1, max=1 << 20)
    columns = torch.export.Dim("columns", min=2, max=1 << 26)
    program = torch.export.export(
        RowSum().eval(), (torch.randn(2, 8),), dynamic_shapes=({0: rows, 1: columns},)
    )
    return save_program(program), [
        {"name": "x", "dtype": "float32", "shape": [None, None]}
    ]


def export_digits(seed: int = 0) -> tuple[bytes, list[dict[str, Any]]]:
    """Export demo/digits.py's DigitsCNN with random weights and a dynamic batch.

    Training would not change its cost. demo.digits is imported here, since
    it imports scikit-learn, which costs a second that cached runs skip.
    """
    from demo.digits import DigitsCNN

    torch.manual_seed(seed)
    module = DigitsCNN().eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        module, (torch.randn(2, 1, 8, 8),), dynamic_shapes=({0: batch},)
    )
    return save_program(program), program_signature(program)


def export_big_weight(size_bytes: int) -> tuple[bytes, list[dict[str, Any]]]:
    """Export BigWeight with a float32 weight of about ``size_bytes``."""
    module = BigWeight(max(1, size_bytes // 4)).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        module, (torch.randn(2, 4),), dynamic_shapes=({0: batch},)
    )
    return save_program(program), [
        {"name": "x", "dtype": "float32", "shape": [None, 4]}
    ]


def load_program(archive: bytes, path: Path) -> nn.Module:
    """Save ``archive`` to ``path`` and load it as an agent does: torch.export.load(...).module()."""
    path.write_bytes(archive)
    return torch.export.load(str(path)).module()
