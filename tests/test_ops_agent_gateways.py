"""The agent with several gateways: parsing the list and rotating on reconnect."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from http import HTTPStatus
from pathlib import Path

import pytest

from gridproto.logformat import JsonFormatter, PlainFormatter, log_format, make_formatter
from nodeagent.backoff import Backoff
from nodeagent.cli import EXIT_TOKEN_REJECTED, EXIT_USAGE, main
from nodeagent.config import AgentConfig, ConfigError, agent_endpoints, resolve_config
from nodeagent.connection import Agent
from nodeagent.testing import FakeGateway, running

TOKEN = "node-secret-token"
REPO = Path(__file__).resolve().parents[1]


def test_gateway_list_parsed():
    config = resolve_config(gateway="http://127.0.0.1:8000, https://grid.example.com/", token="t", environ={})

    assert config.endpoint == "ws://127.0.0.1:8000/ws/agent/"
    assert config.endpoints == ("ws://127.0.0.1:8000/ws/agent/", "wss://grid.example.com/ws/agent/")


def test_single_gateway_has_one_endpoint():
    config = resolve_config(gateway="http://127.0.0.1:8000", token="t", environ={})

    assert config.endpoints == ("ws://127.0.0.1:8000/ws/agent/",)


def test_gateway_list_drops_duplicates():
    endpoints = agent_endpoints("http://a:1,ws://a:1/ws/agent/,http://b:2")

    assert endpoints == ("ws://a:1/ws/agent/", "ws://b:2/ws/agent/")


@pytest.mark.parametrize("value", [",", " , ,"])
def test_empty_gateway_list_rejected(value):
    with pytest.raises(ConfigError) as caught:
        agent_endpoints(value)

    assert "one or more URLs" in str(caught.value)


def test_invalid_url_in_list_rejected():
    with pytest.raises(ConfigError) as caught:
        agent_endpoints("http://a:1,ftp://b")

    assert "ftp://b" in str(caught.value)


async def test_reconnects_to_next_gateway(tmp_path):
    async with FakeGateway() as first, FakeGateway() as second:
        endpoints = agent_endpoints(f"{first.url},{second.url}")
        config = AgentConfig(
            endpoint=endpoints[0],
            more_endpoints=endpoints[1:],
            token=TOKEN,
            name="node-a",
            data_dir=tmp_path,
        )
        agent = Agent(config, backoff=Backoff(base=0.05, cap=0.2))
        async with running(agent):
            session = await first.next_session()
            await session.websocket.close(1001, "going away")
            moved = await second.next_session()
            await moved.websocket.close(1001, "going away")
            back = await first.next_session()

    assert moved.hello["name"] == "node-a"
    assert back.hello["name"] == "node-a"
    assert first.connections == 2
    assert second.connections == 1


def test_log_format_default_plain():
    assert log_format({}) == "plain"


def test_log_format_rejects_unknown():
    with pytest.raises(ValueError) as caught:
        log_format({"GRID_LOG_FORMAT": "xml"})

    assert "GRID_LOG_FORMAT='xml'" in str(caught.value)


def test_json_log_line_fields():
    record = logging.LogRecord("nodeagent.jobs", logging.INFO, __file__, 1, "job %s done", ("j-1",), None)
    record.job_id = "j-1"

    line = json.loads(make_formatter({"GRID_LOG_FORMAT": "json"}).format(record))

    assert line["message"] == "job j-1 done"
    assert line["level"] == "INFO"
    assert line["logger"] == "nodeagent.jobs"
    assert line["job_id"] == "j-1"


def test_logs_mask_tokens():
    token = "node_" + "x" * 43
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "token %s", (token,), None)

    json_line = JsonFormatter().format(record)
    plain_line = PlainFormatter().format(record)

    assert token not in json_line
    assert token not in plain_line
    assert "node_[redacted]" in plain_line


async def test_agent_logs_json(tmp_path):
    environ = {**os.environ, "PYTHONPATH": str(REPO), "GRID_NODE_TOKEN": TOKEN, "GRID_LOG_FORMAT": "json"}
    async with FakeGateway(reject_status=HTTPStatus.FORBIDDEN) as gateway:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nodeagent", "--gateway", gateway.url, "--data-dir", str(tmp_path),
            env=environ, cwd=REPO, stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.strip()]

    assert process.returncode == EXIT_TOKEN_REJECTED
    assert lines[0]["logger"] == "nodeagent.cli"
    assert any("rejected the node token" in line["message"] for line in lines)
    assert TOKEN not in stderr.decode()


def test_agent_rejects_unknown_log_format(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRID_LOG_FORMAT", "xml")

    code = main(["--gateway", "http://127.0.0.1:1", "--token", "t", "--data-dir", str(tmp_path)])

    assert code == EXIT_USAGE
    assert "GRID_LOG_FORMAT='xml'" in capsys.readouterr().err
