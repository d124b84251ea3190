"""Agent settings, the grid-node command line and the reconnect backoff."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from nodeagent.backoff import Backoff
from nodeagent.cli import EXIT_USAGE, main
from nodeagent.config import ConfigError, agent_endpoint, resolve_config
from nodeagent.handshake import HandshakeError, parse_welcome


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("http://127.0.0.1:8000", "ws://127.0.0.1:8000/ws/agent/"),
        ("https://grid.example.com/", "wss://grid.example.com/ws/agent/"),
        ("wss://grid.example.com/grid", "wss://grid.example.com/grid/ws/agent/"),
        ("ws://localhost:8000/ws/agent/", "ws://localhost:8000/ws/agent/"),
        ("HTTP://localhost:8000/ws/agent", "ws://localhost:8000/ws/agent/"),
    ],
)
def test_endpoint_from_url(url, endpoint):
    assert agent_endpoint(url) == endpoint


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://grid.example.com", "expected http(s):// or ws(s)://"),
        ("grid.example.com", "expected http(s):// or ws(s)://"),
        ("https://grid.example.com/?token=x", "remove the query"),
        ("https://user:secret@grid.example.com", "remove the user name"),
    ],
)
def test_endpoint_rejects_url(url, message):
    with pytest.raises(ConfigError) as caught:
        agent_endpoint(url)

    assert message in str(caught.value)


def test_environment_fallbacks():
    environ = {
        "GRID_GATEWAY": "https://grid.example.com",
        "GRID_NODE_TOKEN": "secret",
        "GRID_NODE_NAME": "node-b",
        "GRID_DATA_DIR": "/var/lib/grid",
        "GRID_CONCURRENCY": "4",
        "GRID_TORCH_THREADS": "2",
        "GRID_WS_MAX_BYTES": "8388608",
        "GRID_MAX_MODEL_BYTES": "1000000",
        "GRID_AGENT_DELAY_MS": "250",
    }

    config = resolve_config(environ=environ)

    assert config.endpoint == "wss://grid.example.com/ws/agent/"
    assert config.token == "secret"
    assert config.name == "node-b"
    assert config.data_dir == Path("/var/lib/grid")
    assert config.concurrency == 4
    assert config.torch_threads == 2
    assert config.ws_max_bytes == 8 * 1024 * 1024
    assert config.max_model_bytes == 1_000_000
    assert config.inference_delay_ms == 250


def test_defaults():
    config = resolve_config(gateway="http://localhost:8000", token="secret", environ={})

    assert config.concurrency == 2
    assert config.torch_threads == 1
    assert config.ws_max_bytes == 64 * 1024 * 1024
    assert config.max_model_bytes == 4 * 1024**3
    assert config.inference_delay_ms == 0
    assert config.name != ""


def test_batching_defaults():
    config = resolve_config(gateway="http://localhost:8000", token="secret", environ={})

    assert config.batch_window_ms == 1
    assert config.max_batch_rows == 256
    assert config.fault is None


def test_batching_and_fault_settings():
    environ = {
        "GRID_BATCH_WINDOW_MS": "0",
        "GRID_MAX_BATCH_ROWS": "64",
        "GRID_AGENT_FAULT": "crash-on-infer",
    }

    config = resolve_config(
        gateway="http://localhost:8000",
        token="secret",
        batch_window_ms="5",
        environ=environ,
    )

    assert config.batch_window_ms == 5
    assert config.max_batch_rows == 64
    assert config.fault == "crash-on-infer"


def test_help_lists_knobs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])

    help_text = capsys.readouterr().out
    assert "GRID_BATCH_WINDOW_MS" in help_text
    assert "GRID_MAX_BATCH_ROWS" in help_text
    assert "GRID_AGENT_FAULT" in help_text
    assert "crash-on-infer" in help_text
    assert "wrong-outputs" in help_text


def test_options_override_environment():
    environ = {"GRID_GATEWAY": "https://a.example.com", "GRID_CONCURRENCY": "4"}

    config = resolve_config(
        gateway="https://b.example.com",
        token="secret",
        concurrency="8",
        environ=environ,
    )

    assert config.endpoint == "wss://b.example.com/ws/agent/"
    assert config.concurrency == 8


def test_token_not_in_repr():
    config = resolve_config(gateway="http://localhost", token="top-secret", environ={})

    assert "top-secret" not in repr(config)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"GRID_CONCURRENCY": "two"},
            "--concurrency / GRID_CONCURRENCY must be an integer",
        ),
        (
            {"GRID_CONCURRENCY": "0"},
            "--concurrency / GRID_CONCURRENCY must be at least 1",
        ),
        ({"GRID_WS_MAX_BYTES": "1024"}, "GRID_WS_MAX_BYTES must be at least 2097152"),
        ({"GRID_AGENT_DELAY_MS": "-1"}, "GRID_AGENT_DELAY_MS must be at least 0"),
        (
            {"GRID_BATCH_WINDOW_MS": "-1"},
            "--batch-window-ms / GRID_BATCH_WINDOW_MS must be at least 0",
        ),
        (
            {"GRID_MAX_BATCH_ROWS": "0"},
            "--max-batch-rows / GRID_MAX_BATCH_ROWS must be at least 1",
        ),
        (
            {"GRID_AGENT_FAULT": "explode"},
            "GRID_AGENT_FAULT must be one of wrong-outputs, crash-on-infer, "
            "got 'explode'",
        ),
    ],
)
def test_invalid_numbers(environ, message):
    with pytest.raises(ConfigError) as caught:
        resolve_config(gateway="http://localhost", token="secret", environ=environ)

    assert message in str(caught.value)


def test_missing_token_exits_2(monkeypatch, capsys):
    monkeypatch.delenv("GRID_NODE_TOKEN", raising=False)

    code = main(["--gateway", "http://127.0.0.1:9"])

    assert code == EXIT_USAGE
    assert (
        "missing node token: pass --token or set GRID_NODE_TOKEN"
        in capsys.readouterr().err
    )


def test_missing_gateway_exits_2(monkeypatch, capsys):
    monkeypatch.delenv("GRID_GATEWAY", raising=False)

    code = main(["--token", "secret"])

    assert code == EXIT_USAGE
    assert (
        "missing gateway URL: pass --gateway or set GRID_GATEWAY"
        in capsys.readouterr().err
    )


def test_invalid_log_level_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("GRID_LOG_LEVEL", "chatty")

    code = main(["--gateway", "http://127.0.0.1:9", "--token", "secret"])

    assert code == EXIT_USAGE
    assert "GRID_LOG_LEVEL must be one of" in capsys.readouterr().err


class UpperBound(random.Random):
    """Draws the upper bound every time, exposing the ceiling of each delay."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_ceilings():
    backoff = Backoff(rng=UpperBound())

    delays = [backoff.next_delay() for _ in range(9)]

    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_backoff_jitter_within_ceiling():
    backoff = Backoff(rng=random.Random(7))

    delays = [backoff.next_delay() for _ in range(50)]

    assert min(delays) >= 0
    assert max(delays) <= 30.0
    assert len(set(delays)) == 50


def test_backoff_reset():
    backoff = Backoff(rng=UpperBound())
    for _ in range(10):
        backoff.next_delay()

    backoff.reset()

    assert backoff.attempt == 0
    assert backoff.next_delay() == 0.5


WELCOME = {
    "type": "welcome",
    "protocol": 1,
    "node_id": 3,
    "heartbeat_interval": 2.0,
    "max_frame_bytes": 67108864,
}


def test_welcome_accepted():
    assert parse_welcome(json.dumps(WELCOME)) == WELCOME


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00\x00\x02{}", "expected a welcome message, got a binary frame"),
        (
            json.dumps({"type": "disconnect", "reason": "bye"}),
            "expected a welcome message, got disconnect",
        ),
        (
            json.dumps({"type": "error", "code": "protocol", "message": "too old"}),
            "gateway error protocol: too old",
        ),
        (
            json.dumps({**WELCOME, "protocol": 2}),
            "gateway uses protocol 2, but this agent supports only protocol 1",
        ),
        (
            json.dumps({**WELCOME, "heartbeat_interval": 0}),
            "heartbeat_interval must be positive, got 0",
        ),
        (
            json.dumps({**WELCOME, "max_frame_bytes": -1}),
            "max_frame_bytes must be positive, got -1",
        ),
        (json.dumps({"type": "welcome"}), "invalid welcome: welcome: field 'protocol'"),
    ],
)
def test_welcome_rejected(data, message):
    with pytest.raises(HandshakeError) as caught:
        parse_welcome(data)

    assert message in str(caught.value)
