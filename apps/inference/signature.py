"""Input signatures: how a model declares its inputs, and the checks on requests.

A signature is a list such as
``[{"name": "input", "dtype": "float32", "shape": [null, 1, 8, 8]}]`` where
``null`` marks a dynamic dimension. Requests are checked against it on the
gateway, so a bad request never reaches a node and never counts against one.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gridproto.tensors import DTYPES, TensorInfo

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")
MAX_RANK = 8


class SignatureError(ValueError):
    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


def parse_signature(raw: Any) -> list[dict[str, Any]]:
    """Validate a signature given as JSON text or a list; return it normalized."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise SignatureError("input_signature is not valid JSON", "input_signature") from None
    example = '[{"name": "input", "dtype": "float32", "shape": [null, 1, 8, 8]}]'
    if not isinstance(raw, list) or not raw:
        raise SignatureError(f"input_signature must be a non-empty list such as {example}", "input_signature")
    signature = []
    for position, entry in enumerate(raw):
        where = f"input_signature[{position}]"
        if not isinstance(entry, dict):
            raise SignatureError(f"{where} must be an object such as {example[1:-1]}", "input_signature")
        name, dtype, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
        if not isinstance(name, str) or not NAME.match(name):
            raise SignatureError(f"{where}.name must be an identifier of up to 100 characters, got {name!r}", "input_signature")
        if dtype not in DTYPES.values():
            raise SignatureError(f"{where}.dtype {dtype!r} is not supported; use one of {', '.join(DTYPES.values())}", "input_signature")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= 1) for d in shape):
            raise SignatureError(f"{where}.shape must list up to {MAX_RANK} positive sizes or null for dynamic ones, got {shape!r}", "input_signature")
        signature.append({"name": name, "dtype": dtype, "shape": shape})
    names = [e["name"] for e in signature]
    if len(set(names)) != len(names):
        raise SignatureError("input_signature names must be unique", "input_signature")
    return signature


def _describe(shape: list[int | None]) -> str:
    return "[" + ", ".join("any" if d is None else str(d) for d in shape) + "]"


def check_inputs(signature: list[dict[str, Any]], tensors: dict[str, TensorInfo]) -> None:
    """Raise SignatureError naming the input when a request does not fit the signature."""
    expected = {entry["name"]: entry for entry in signature}
    names = ", ".join(expected)
    for name in tensors:
        if name not in expected:
            raise SignatureError(f"unknown input {name!r}; the model takes: {names}", name)
    for name, entry in expected.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise SignatureError(f"missing input {name!r}; the model takes: {names}", name)
        if tensor.dtype != entry["dtype"]:
            raise SignatureError(f"input {name!r} has dtype {tensor.dtype}; the model expects {entry['dtype']}", name)
        shape = entry["shape"]
        if len(tensor.shape) != len(shape):
            raise SignatureError(
                f"input {name!r} has {len(tensor.shape)} dimensions {list(tensor.shape)}; the model expects {len(shape)}: {_describe(shape)}",
                name,
            )
        for axis, (got, want) in enumerate(zip(tensor.shape, shape, strict=True)):
            if want is not None and got != want:
                raise SignatureError(
                    f"input {name!r} has size {got} in dimension {axis} (shape {list(tensor.shape)}); the model expects {_describe(shape)}",
                    name,
                )
            if got == 0:
                raise SignatureError(f"input {name!r} is empty in dimension {axis}; send at least one row", name)
