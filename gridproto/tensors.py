"""Read safetensors headers without loading tensors or importing torch.

The gateway checks requests against a model's input signature with this, so a
bad request is rejected before any node sees it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

MAX_HEADER_BYTES = 1024 * 1024

# safetensors dtype codes and the names used in input signatures.
DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class TensorFormatError(ValueError):
    """Bytes that are not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]


def read_tensor_infos(data: bytes | memoryview, *, total_size: int | None = None) -> dict[str, TensorInfo]:
    """Return the name, dtype and shape of each tensor in a safetensors buffer.

    Checks that every tensor's byte range matches its dtype and shape and lies
    inside the buffer, so a valid result means the agent can load it.
    ``total_size`` is the size of the whole file when ``data`` holds only its
    first bytes (the 8-byte length and the header): the byte ranges are then
    checked against the file, so a header is validated without reading tensors.
    """
    view = memoryview(data)
    if len(view) < 8:
        raise TensorFormatError("body is not safetensors: it is shorter than the 8-byte header length")
    (length,) = struct.unpack_from("<Q", view)
    if length > MAX_HEADER_BYTES or 8 + length > len(view):
        raise TensorFormatError(f"body is not safetensors: header length {length} does not fit the {len(view)}-byte body")
    try:
        header = json.loads(bytes(view[8 : 8 + length]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise TensorFormatError("body is not safetensors: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise TensorFormatError("body is not safetensors: its header is not a JSON object")

    data_size = (len(view) if total_size is None else total_size) - 8 - length
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise TensorFormatError(f"tensor {name!r} has a malformed header entry")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(code, str) or code not in DTYPES:
            raise TensorFormatError(f"tensor {name!r} has unsupported dtype {code!r}; use one of {', '.join(DTYPES.values())}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise TensorFormatError(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise TensorFormatError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * ITEM_SIZES[code]:
            raise TensorFormatError(f"tensor {name!r}: its byte range does not match dtype {DTYPES[code]} and shape {shape}")
        infos[name] = TensorInfo(name=name, dtype=DTYPES[code], shape=tuple(shape))
    return infos
