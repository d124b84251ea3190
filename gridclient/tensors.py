"""Convert datasets to safetensors request bodies and outputs back to tensors.

Tensors travel as numpy arrays inside this module. torch is used only when the
caller passed torch tensors, and then it is already imported.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors.numpy

# Default input bytes per inference request when batch_size is not given.
DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024

_OUTPUT_NAME = re.compile(r"output(?:_(\d+))?")


def is_torch_tensor(value: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def to_numpy(value: Any, name: str) -> np.ndarray:
    """Convert a torch tensor or array-like input to a C-contiguous numpy array."""
    if is_torch_tensor(value):
        if str(value.dtype) == "torch.bfloat16":
            raise TypeError(
                f"input {name!r} is bfloat16, which numpy cannot represent; "
                "convert it with .float() before calling run_remote_inference"
            )
        array = value.detach().cpu().numpy()
    else:
        array = np.asarray(value)
    if array.dtype == object:
        raise TypeError(f"input {name!r} is not numeric: numpy gave it dtype object")
    return np.ascontiguousarray(array)


def prepare_inputs(
    dataset: Any, input_names: list[str]
) -> tuple[dict[str, np.ndarray], bool]:
    """Map a dataset to one array per input name.

    A single tensor or array is used for a model with exactly one input. A
    mapping must have exactly the model's input names as keys. Returns the
    arrays and whether the caller passed torch tensors.
    """
    if isinstance(dataset, Mapping):
        missing = [name for name in input_names if name not in dataset]
        unknown = [str(name) for name in dataset if name not in input_names]
        if missing or unknown:
            raise ValueError(
                f"dataset keys must be the model's input names {input_names}: "
                f"missing {missing}, unknown {unknown}"
            )
        values = {name: dataset[name] for name in input_names}
    else:
        if len(input_names) != 1:
            raise ValueError(
                f"the model takes {len(input_names)} inputs {input_names}; "
                "pass a dict that maps each input name to a tensor"
            )
        values = {input_names[0]: dataset}

    as_torch = any(is_torch_tensor(value) for value in values.values())
    arrays = {name: to_numpy(value, name) for name, value in values.items()}
    _check_rows(arrays)
    return arrays, as_torch


def _check_rows(arrays: dict[str, np.ndarray]) -> None:
    for name, array in arrays.items():
        if array.ndim == 0:
            raise ValueError(
                f"input {name!r} is a scalar; inputs need a batch dimension at dim 0"
            )
    rows = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"inputs must have the same size at dim 0, got {rows}")
    if next(iter(rows.values())) == 0:
        raise ValueError("the dataset has no rows: dim 0 of the input is 0")


def count_rows(arrays: dict[str, np.ndarray]) -> int:
    return next(iter(arrays.values())).shape[0]


def rows_per_chunk(
    arrays: dict[str, np.ndarray],
    batch_size: int | None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> int:
    """Return how many rows each inference request carries.

    With batch_size None, a chunk contains as many rows as fit in max_chunk_bytes
    of input, and at least one row even if a single row is larger.
    """
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        return batch_size
    row_bytes = sum(array.nbytes for array in arrays.values()) // count_rows(arrays)
    return max(1, max_chunk_bytes // max(1, row_bytes))


def split_rows(
    arrays: dict[str, np.ndarray], chunk_rows: int
) -> list[dict[str, np.ndarray]]:
    total = count_rows(arrays)
    return [
        {name: array[start : start + chunk_rows] for name, array in arrays.items()}
        for start in range(0, total, chunk_rows)
    ]


def encode(arrays: dict[str, np.ndarray]) -> bytes:
    return safetensors.numpy.save(
        {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    )


def decode(body: bytes) -> dict[str, np.ndarray]:
    """Load a safetensors response body, with outputs ordered output_0, output_1, ..."""
    try:
        tensors = safetensors.numpy.load(body)
    except KeyError as exc:
        # safetensors 0.8 raises KeyError for dtypes numpy lacks, such as BF16.
        raise TypeError(
            f"the model returned dtype {exc.args[0]}, which numpy cannot represent; "
            "return float32 from the model's forward"
        ) from None
    return dict(sorted(tensors.items(), key=lambda item: _output_index(item[0])))


def _output_index(name: str) -> tuple[int, str]:
    match = _OUTPUT_NAME.fullmatch(name)
    if match is None:
        return (sys.maxsize, name)
    return (int(match.group(1) or 0), name)


def concatenate(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Join per-chunk outputs along dim 0, keeping the chunks' order."""
    names = list(chunks[0])
    for index, chunk in enumerate(chunks):
        if list(chunk) != names:
            raise ValueError(
                f"response {index} has outputs {list(chunk)}, expected {names}"
            )
    if len(chunks) == 1:
        return chunks[0]
    return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in names}


def to_result(outputs: dict[str, np.ndarray], as_torch: bool) -> Any:
    """Return one output as a tensor, or several as a dict keyed by output name."""
    if as_torch:
        import torch

        # torch.from_numpy warns about read-only arrays, so those are copied.
        converted = {
            name: torch.from_numpy(array if array.flags.writeable else array.copy())
            for name, array in outputs.items()
        }
    else:
        converted = dict(outputs)
    if len(converted) == 1:
        return next(iter(converted.values()))
    return converted
