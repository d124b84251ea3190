"""Small real torch programs for tests."""

from __future__ import annotations

import io

import torch
from torch import nn


def export_bytes(model: nn.Module | None = None, example: torch.Tensor | None = None) -> bytes:
    """Export a model with a dynamic batch dimension and return the .pt2 bytes."""
    model = (model or nn.Sequential(nn.Flatten(), nn.Linear(4, 3))).eval()
    example = example if example is not None else torch.rand(2, 4)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()
