"""The ``hello`` the agent sends first and the ``welcome`` it expects back."""

from __future__ import annotations

from typing import Any

from gridproto import PROTOCOL_VERSION
from gridproto.messages import GATEWAY_MESSAGES, MessageError, parse_control
from nodeagent import __version__
from nodeagent.config import AgentConfig
from nodeagent.host import capabilities

GATEWAY_SCHEMA = GATEWAY_MESSAGES


class HandshakeError(Exception):
    """The gateway did not respond to ``hello`` with a valid ``welcome``."""


def hello_message(
    config: AgentConfig,
    models: list[dict[str, Any]],
    datasets: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "type": "hello",
        "protocol": PROTOCOL_VERSION,
        "agent_version": __version__,
        "name": config.name,
        "capabilities": capabilities(),
        "concurrency": config.concurrency,
        "models": models,
        "datasets": datasets or [],
    }


def parse_welcome(data: str | bytes) -> dict[str, Any]:
    """Return the gateway's reply to ``hello`` if it is a usable ``welcome``.

    Raises HandshakeError for a binary frame, an ``error`` message, another
    message type, another protocol version or a non-positive limit.
    """
    if not isinstance(data, str):
        raise HandshakeError("expected a welcome message, got a binary frame")
    try:
        message = parse_control(data, GATEWAY_SCHEMA)
    except MessageError as exc:
        raise HandshakeError(f"invalid welcome: {exc}") from None
    if message["type"] == "error":
        raise HandshakeError(f"gateway error {message['code']}: {message['message']}")
    if message["type"] != "welcome":
        raise HandshakeError(f"expected a welcome message, got {message['type']}")
    if message["protocol"] != PROTOCOL_VERSION:
        raise HandshakeError(
            f"gateway uses protocol {message['protocol']}, but this agent "
            f"supports only protocol {PROTOCOL_VERSION}. Upgrade the agent or "
            "the gateway."
        )
    for field in ("heartbeat_interval", "max_frame_bytes"):
        if not message[field] > 0:
            raise HandshakeError(f"{field} must be positive, got {message[field]}")
    return message
