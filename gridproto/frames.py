"""Binary websocket frames: a length-prefixed JSON header followed by raw bytes.

Layout: 4-byte big-endian header length ``H``, then ``H`` bytes of UTF-8 JSON
(an object with a string ``type``), then the body. Tensors travel as
safetensors bytes in the body and model files as raw chunks.
"""

from __future__ import annotations

import json
import struct
from typing import Any

MAX_HEADER_BYTES = 64 * 1024
_LENGTH = struct.Struct(">I")


class FrameError(ValueError):
    """A binary frame that does not follow the layout above."""


def encode_frame(header: dict[str, Any], body: bytes | memoryview = b"") -> bytes:
    encoded = json.dumps(header, separators=(",", ":")).encode()
    if len(encoded) > MAX_HEADER_BYTES:
        raise FrameError(f"frame header is {len(encoded)} bytes; the limit is {MAX_HEADER_BYTES}")
    return b"".join((_LENGTH.pack(len(encoded)), encoded, body))


def decode_frame(frame: bytes) -> tuple[dict[str, Any], memoryview]:
    """Split a frame into its header and a zero-copy view of its body."""
    if len(frame) < _LENGTH.size:
        raise FrameError("frame is shorter than its 4-byte header length")
    (length,) = _LENGTH.unpack_from(frame)
    if length > MAX_HEADER_BYTES:
        raise FrameError(f"frame header length {length} is over the limit of {MAX_HEADER_BYTES}")
    end = _LENGTH.size + length
    if end > len(frame):
        raise FrameError(f"frame header length {length} runs past the end of a {len(frame)}-byte frame")
    try:
        header = json.loads(bytes(frame[_LENGTH.size : end]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"frame header is not valid JSON: {exc}") from None
    except RecursionError:
        raise FrameError("frame header is JSON nested too deeply to parse") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise FrameError("frame header must be a JSON object with a string 'type'")
    return header, memoryview(frame)[end:]
