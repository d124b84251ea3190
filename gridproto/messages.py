"""Control messages of the agent protocol: JSON text frames with a ``type``.

``parse_control`` checks a text frame against the fields each type needs, so
both ends reject malformed input with a message instead of a KeyError later.
docs/protocol.md describes every message.
"""

from __future__ import annotations

import json
from typing import Any

MAX_TEXT_BYTES = 1024 * 1024

_NUMBER = (int, float)

# type -> {field: expected Python types}; fields not listed are ignored.
AGENT_MESSAGES: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {"protocol": (int,), "name": (str,), "capabilities": (dict,), "concurrency": (int,), "models": (list,)},
    "heartbeat": {"seq": (int,), "in_flight": (int,)},
    "model.ready": {"sha256": (str,)},
    "model.failed": {"sha256": (str,), "error": (str,)},
    "model.evicted": {"sha256": (str,)},
    "model.upload_failed": {"sha256": (str,), "error": (str,)},
    "infer.error": {"job_id": (str,), "attempt": (int,), "error": (str,), "kind": (str,)},
    "infer.summary": {"job_id": (str,), "attempt": (int,), "summary": (dict,)},
    "datasets": {"datasets": (list,)},
    "bye": {"reason": (str,)},
}
GATEWAY_MESSAGES: dict[str, dict[str, tuple[type, ...]]] = {
    "welcome": {"protocol": (int,), "node_id": (int,), "heartbeat_interval": _NUMBER, "max_frame_bytes": (int,)},
    "model.offer": {"sha256": (str,), "size": (int,), "model_id": (str,)},
    "model.evict": {"sha256": (str,)},
    # aggregate and outputs are optional, so the agent checks them.
    "infer.dataset": {"job_id": (str,), "attempt": (int,), "sha256": (str,), "dataset": (str,), "timeout": _NUMBER},
    "model.upload": {"sha256": (str,)},
    "disconnect": {"reason": (str,)},
    "error": {"code": (str,), "message": (str,)},
}


class MessageError(ValueError):
    """A control message that is not valid JSON or lacks a required field."""


def parse_control(text: str | bytes, schema: dict[str, dict[str, tuple[type, ...]]]) -> dict[str, Any]:
    if len(text) > MAX_TEXT_BYTES:
        raise MessageError(f"control message is {len(text)} bytes; the limit is {MAX_TEXT_BYTES}")
    try:
        message = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise MessageError("control message is not valid JSON") from None
    if not isinstance(message, dict):
        raise MessageError("control message must be a JSON object")
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in schema:
        raise MessageError(f"unknown message type {kind!r}; expected one of {', '.join(sorted(schema))}")
    for field, types in schema[kind].items():
        value = message.get(field)
        if not isinstance(value, types) or isinstance(value, bool):
            expected = " or ".join(t.__name__ for t in types)
            raise MessageError(f"{kind}: field {field!r} must be {expected}, got {type(value).__name__}")
    return message
