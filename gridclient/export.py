"""Export torch models to .pt2 archives and describe their inputs.

torch is imported inside the functions that need it, so the client works
without torch for numpy inference and for serving already-saved .pt2 files.
"""

from __future__ import annotations

import io
import os
from typing import Any

# Input dtypes that the gateway accepts in an input signature.
SIGNATURE_DTYPES = frozenset(
    {
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
    }
)


def build(model: Any, data: Any) -> Any:
    """Store example inputs on a model for serve_model, and return the model.

    This mirrors ``model.build(data)`` from PySyft plans: serve_model uses the
    stored inputs to export the model when it gets no example_inputs.
    """
    model.grid_example_inputs = data
    return model


def prepare_archive(
    model: Any,
    example_inputs: Any = None,
    input_signature: list[dict[str, Any]] | None = None,
) -> tuple[bytes, list[dict[str, Any]]]:
    """Return the .pt2 bytes and input signature for any model serve_model accepts.

    ``model`` is an nn.Module, a torch.export.ExportedProgram, the bytes of a
    saved .pt2 archive, or a path to one. Saved archives need
    ``input_signature``. A given ``input_signature`` replaces the one derived
    from an export.
    """
    if isinstance(model, (bytes, bytearray, memoryview, str, os.PathLike)):
        if input_signature is None:
            raise ValueError(
                "input_signature= is required when model is a saved .pt2 archive, "
                'for example [{"name": "x", "dtype": "float32", "shape": [None, 3]}]'
            )
        return read_archive(model), validate_signature(input_signature)

    import torch

    if isinstance(model, torch.export.ExportedProgram):
        archive, signature = save_program(model), program_signature(model)
    else:
        if example_inputs is None:
            example_inputs = getattr(model, "grid_example_inputs", None)
        if example_inputs is None:
            raise ValueError(
                "serve_model needs example inputs to export the model: pass "
                "example_inputs= or call gr.build(model, data) first"
            )
        archive, signature = export_model(model, example_inputs)
    if input_signature is not None:
        signature = validate_signature(input_signature)
    return archive, signature


def export_model(model: Any, example_inputs: Any) -> tuple[bytes, list[dict[str, Any]]]:
    """Export an nn.Module with a dynamic batch dimension and save it to bytes.

    Dim 0 of every input is one shared dynamic dimension, so all inputs of a
    request must have the same number of rows. Returns the .pt2 bytes and the
    input signature. Raises ValueError when torch.export cannot export the
    model with a dynamic batch, for example when forward reshapes with a fixed
    batch size.
    """
    import torch

    inputs = _as_tuple(example_inputs)
    inputs = _widen_single_row(inputs)
    batch = torch.export.Dim("batch", min=1)
    dynamic_shapes = tuple({0: batch} for _ in inputs)
    try:
        program = torch.export.export(
            model.eval(), inputs, dynamic_shapes=dynamic_shapes
        )
    except Exception as exc:  # torch raises several unrelated types here
        raise ValueError(
            "torch.export could not export the model with a dynamic batch "
            f"dimension at dim 0 of every input: {exc}"
        ) from exc
    return save_program(program), program_signature(program)


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    import torch

    if isinstance(example_inputs, torch.Tensor):
        inputs: tuple[Any, ...] = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        inputs = tuple(example_inputs)
    else:
        raise TypeError(
            "example_inputs must be a tensor or a tuple of tensors, "
            f"got {type(example_inputs).__name__}"
        )
    for index, value in enumerate(inputs):
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"example input {index} is {type(value).__name__}, expected a tensor"
            )
        if value.dim() == 0:
            raise ValueError(
                f"example input {index} is a scalar; inputs need a batch dimension"
            )
    rows = {value.shape[0] for value in inputs}
    if len(rows) != 1:
        raise ValueError(
            f"example inputs must have the same size at dim 0, got {sorted(rows)}"
        )
    return inputs


def _widen_single_row(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    # torch.export specializes a dimension whose example size is 1 and then
    # rejects it as dynamic, so a one-row example is repeated to two rows.
    if inputs[0].shape[0] != 1:
        return inputs
    return tuple(value.repeat(2, *([1] * (value.dim() - 1))) for value in inputs)


def save_program(program: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def program_signature(program: Any) -> list[dict[str, Any]]:
    """Describe the user inputs of an exported program.

    Each entry has the input name, its dtype name and its shape, with None for
    every dynamic dimension.
    """
    names = list(program.graph_signature.user_inputs)
    placeholders = {
        node.name: node for node in program.graph.nodes if node.op == "placeholder"
    }
    signature = []
    for name in names:
        value = placeholders[name].meta.get("val")
        if value is None or not hasattr(value, "shape"):
            raise ValueError(
                f"input {name!r} of the exported program is not a tensor; "
                "Grid serves models whose inputs are tensors"
            )
        shape = [dim if isinstance(dim, int) else None for dim in value.shape]
        signature.append(
            {
                "name": name,
                "dtype": str(value.dtype).removeprefix("torch."),
                "shape": shape,
            }
        )
    return signature


def read_archive(model: bytes | str | os.PathLike[str]) -> bytes:
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model)
    with open(model, "rb") as file:
        return file.read()


def validate_signature(signature: Any) -> list[dict[str, Any]]:
    """Check an input signature passed by the caller and return it as a list.

    The gateway checks it again against the archive. This catches the common
    mistakes before a possibly large upload.
    """
    if not isinstance(signature, (list, tuple)) or not signature:
        raise ValueError(
            "input_signature must be a non-empty list of "
            '{"name": ..., "dtype": ..., "shape": [...]} dicts'
        )
    checked = []
    for index, entry in enumerate(signature):
        if not isinstance(entry, dict):
            raise TypeError(f"input_signature[{index}] must be a dict, got {entry!r}")
        name = entry.get("name")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        if not isinstance(name, str) or not name:
            raise ValueError(f"input_signature[{index}] has no name")
        if dtype not in SIGNATURE_DTYPES:
            raise ValueError(
                f"input_signature[{index}] has dtype {dtype!r}; "
                f"use one of {', '.join(sorted(SIGNATURE_DTYPES))}"
            )
        if not isinstance(shape, (list, tuple)) or not all(
            dim is None or (isinstance(dim, int) and dim >= 0) for dim in shape
        ):
            raise ValueError(
                f"input_signature[{index}] has shape {shape!r}; use a list of "
                "non-negative ints, with None for dynamic dimensions"
            )
        checked.append({"name": name, "dtype": dtype, "shape": list(shape)})
    return checked
