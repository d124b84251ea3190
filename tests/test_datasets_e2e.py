"""Datasets on nodes, end to end: real gateway, Celery and agent processes.

Two agent processes each hold a shard of a small labelled dataset, written
into their data directories before they start. A third node, "probe", runs
in this test process so that every byte it sends to the gateway can be
recorded (see test_rows_never_reach_gateway).
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as websocket_connect

import gridclient as gr
from nodeagent import connection as agent_connection
from nodeagent.config import AgentConfig, agent_endpoint
from nodeagent.connection import Agent
from tests.e2e import start_network, stop_network

pytestmark = pytest.mark.e2e

ROWS = 40
# 16 bytes that read as four finite float32 values. Every row of the probe's
# dataset is these bytes, so any copy of a row that leaves the node shows them.
MARKER = b"ROWSNEVERLEAVE!!"


def toy_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()


def shard(index: int) -> dict[str, torch.Tensor]:
    """Rows with labels that match the toy model's argmax except for every fourth row."""
    generator = torch.Generator().manual_seed(index)
    rows = torch.rand(ROWS, 4, generator=generator) * 4 - 2
    with torch.no_grad():
        labels = toy_model()(rows).argmax(dim=1)
    labels[::4] = (labels[::4] + 1) % 3
    return {"input": rows, "labels": labels}


def write_dataset(data_dir: Path, name: str, tensors: dict[str, torch.Tensor], **manifest) -> None:
    folder = data_dir / "datasets"
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps({"name": name, **manifest}))


def prepare_node(name: str, data_dir: Path) -> None:
    index = int(name.rsplit("-", 1)[1])
    # Only shard 2 lets a request read the model's raw outputs.
    write_dataset(
        data_dir,
        f"toy-shard-{index}",
        shard(index),
        tags=["toy", "test", f"shard-{index}"],
        label_tensor="labels",
        allow_raw_outputs=index == 2,
    )


class RecordingConnection(ClientConnection):
    """A client connection that keeps a copy of every message it sends."""

    sent: list[bytes] = []

    async def send(self, message, text=None) -> None:
        if isinstance(message, str):
            RecordingConnection.sent.append(message.encode())
        elif isinstance(message, (bytes, bytearray, memoryview)):
            RecordingConnection.sent.append(bytes(message))
        else:
            # A fragmented message would escape the recording, so the test stops.
            raise AssertionError(f"the agent sent a fragmented message: {type(message).__name__}")
        await super().send(message, text=text)


class ProbeNode:
    """A node agent on a thread of this process, connected to the real gateway."""

    def __init__(self, gateway_url: str, token: str, data_dir: Path) -> None:
        config = AgentConfig(endpoint=agent_endpoint(gateway_url), token=token, name="probe", data_dir=data_dir, concurrency=1)
        self.monkeypatch = pytest.MonkeyPatch()
        self.monkeypatch.setattr(agent_connection, "connect", functools.partial(websocket_connect, create_connection=RecordingConnection))
        self.agent = Agent(config)
        self.started = threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)
        self.thread.start()
        self.started.wait(timeout=10)

    async def _run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.started.set()
        await self.agent.run()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.agent.stop)
        self.thread.join(timeout=15)
        self.monkeypatch.undo()


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    net = start_network(tmp_path_factory.mktemp("grid"), agents=2, prepare_node=prepare_node)
    probe_dir = net.data_root / "probe"
    write_dataset(
        probe_dir,
        "probe-rows",
        {"input": torch.frombuffer(bytearray(MARKER * ROWS), dtype=torch.float32).reshape(ROWS, 4)},
        tags=["toy", "secret"],
    )
    probe = ProbeNode(net.stack.url, net.stack.manage("createnode", "probe"), probe_dir)
    try:
        net.wait_online(3)
        yield net
    finally:
        probe.stop()
        stop_network(net)


@pytest.fixture(scope="module")
def served(network):
    with network.client() as gateway:
        gateway.serve_model(
            toy_model(), "toy", allow_remote_inference=True, replicas=3, example_inputs=torch.rand(4, 4), progress=False
        )
    return toy_model()


def find(gateway, *tags: str) -> dict[str, dict]:
    return {item["name"]: item for item in gateway.search(*tags)}


def wait_for(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout} s")


def test_search_needs_every_tag(network):
    with network.client() as gateway:
        both = find(gateway, "toy", "test")
        shard_one = find(gateway, "TOY", "shard-1")
        everything = find(gateway, "toy")
        nothing = gateway.search("toy", "no-such-tag")
    assert sorted(both) == ["toy-shard-1", "toy-shard-2"]
    assert list(shard_one) == ["toy-shard-1"]
    assert sorted(everything) == ["probe-rows", "toy-shard-1", "toy-shard-2"]
    assert nothing == []


def test_search_result_describes_dataset(network):
    with network.client() as gateway:
        result = find(gateway, "shard-1")["toy-shard-1"]
    assert result["node_name"] == "node-1"
    assert result["node_status"] == "online"
    assert result["rows"] == ROWS
    assert result["label_tensor"] == "labels"
    assert result["tensors"]["input"] == {"dtype": "float32", "shape": [ROWS, 4]}


def test_available_tags(network):
    with network.client() as gateway:
        tags = gateway.available_tags()
    assert tags == ["secret", "shard-1", "shard-2", "test", "toy"]


def test_model_lookup(network, served):
    with network.client() as gateway:
        holders = sorted(p.node_name for p in gateway.search_model("toy"))
        found = [m.model_id for m in gateway.available_models(search="to")]
    assert holders == ["node-1", "node-2", "probe"]
    assert found == ["toy"]


def test_predictions_match_local_model(network, served):
    with network.client() as gateway:
        ref = find(gateway, "shard-1")["toy-shard-1"]
        predictions, info = gateway.run_remote_inference_with_info("toy", dataset=ref)
    with torch.inference_mode():
        expected = served(shard(1)["input"]).argmax(dim=1)
    assert predictions.dtype == np.int64
    assert predictions.tolist() == expected.tolist()
    assert info.node == "node-1"


def test_summary_has_accuracy(network, served):
    with network.client() as gateway:
        ref = gr.DatasetRef.from_value(find(gateway, "shard-2")["toy-shard-2"])
        summary = gateway.run_remote_inference("toy", dataset=ref, aggregate=True)
    with torch.inference_mode():
        expected = served(shard(2)["input"]).argmax(dim=1)
    counts = {str(label): int(count) for label, count in zip(*np.unique(expected.numpy(), return_counts=True), strict=True)}
    assert summary["rows"] == ROWS
    assert summary["class_counts"] == counts
    assert summary["correct"] == ROWS - ROWS // 4
    assert summary["accuracy"] == pytest.approx(0.75)


def test_raw_outputs_when_allowed(network, served):
    with network.client() as gateway:
        ref = find(gateway, "shard-2")["toy-shard-2"]
        outputs = gateway.run_remote_inference("toy", dataset=ref, raw_outputs=True)
    with torch.inference_mode():
        expected = served(shard(2)["input"])
    assert outputs.shape == (ROWS, 3)
    assert np.allclose(outputs, expected.numpy(), atol=1e-5)


def test_raw_outputs_refused_by_manifest(network, served):
    with network.client() as gateway:
        ref = find(gateway, "shard-1")["toy-shard-1"]
        with pytest.raises(gr.ModelError) as caught:
            gateway.run_remote_inference("toy", dataset=ref, raw_outputs=True)
    assert caught.value.status == 422
    assert "does not allow raw outputs" in caught.value.message


def test_rows_never_reach_gateway(network, served):
    """The probe node's rows never appear in anything it sent to the gateway.

    Every message the gateway receives from the probe passes through its
    websocket connection's ``send``: hello, heartbeats, results and bye alike,
    because the agent writes nothing to the socket any other way (ping and pong
    frames carry only the protocol's own few bytes). RecordingConnection keeps
    a copy of each, so if a row's bytes had been sent, the marker that fills
    every row would be in the recording. The recording must also hold the
    answers of this test's jobs, so an empty recording cannot pass.
    """
    data = (network.data_root / "probe" / "datasets" / "probe-rows.safetensors").read_bytes()
    with network.client() as gateway:
        ref = find(gateway, "secret")["probe-rows"]
        predictions = gateway.run_remote_inference("toy", dataset=ref)
        summary = gateway.run_remote_inference("toy", dataset=ref, aggregate=True)
    sent = list(RecordingConnection.sent)
    assert MARKER in data
    assert len(predictions) == ROWS
    assert summary["rows"] == ROWS
    assert any(b"infer.result" in frame for frame in sent)
    assert any(b"infer.summary" in frame for frame in sent)
    assert not [frame[:80] for frame in sent if MARKER[:8] in frame or MARKER[8:] in frame]


def test_replica_placed_on_dataset_node(network, served):
    with network.client() as gateway:
        gateway.serve_model(
            toy_model(), "toy-one", allow_remote_inference=True, replicas=1, example_inputs=torch.rand(4, 4), progress=False
        )
        holder = gateway.search_model("toy-one")[0].node_name
        other = next(ref for ref in gateway.search("toy", "test") if ref["node_name"] != holder)
        summary = gateway.run_remote_inference("toy-one", dataset=other, aggregate=True, timeout=60)
        holders = sorted(p.node_name for p in gateway.search_model("toy-one"))
    assert summary["rows"] == ROWS
    assert holders == sorted([holder, other["node_name"]])


def test_private_model_without_replica_409(network, served):
    with network.client() as gateway:
        gateway.serve_model(
            toy_model(), "toy-private", allow_remote_inference=False, replicas=1, example_inputs=torch.rand(4, 4), progress=False
        )
        holder = gateway.search_model("toy-private")[0].node_name
        other = next(ref for ref in gateway.search("toy") if ref["node_name"] != holder)
        with pytest.raises(gr.Conflict) as caught:
            gateway.run_remote_inference("toy-private", dataset=other)
    assert caught.value.status == 409
    assert caught.value.code == "no_replica"
    assert "serve the model with more replicas" in caught.value.message


def test_sighup_rescans_datasets(network):
    write_dataset(network.data_root / "node-2", "late-arrival", shard(3), tags=["late"])
    network.stack.kill("node-2", signal.SIGHUP)
    with network.client() as gateway:
        found = wait_for(lambda: gateway.search("late"), what="the new dataset in search results")
    assert [item["name"] for item in found] == ["late-arrival"]
    assert found[0]["node_name"] == "node-2"


def test_offline_node_left_out(network, served):
    network.stack.kill("node-1", signal.SIGTERM)
    with network.client() as gateway:
        wait_for(lambda: "toy-shard-1" not in find(gateway, "toy", "test"), what="node-1's shard gone from search")
        everywhere = {item["name"]: item["node_status"] for item in gateway.search("toy", "test", include_offline=True)}
        with pytest.raises(gr.Unavailable) as caught:
            gateway.run_remote_inference("toy", dataset={"name": "toy-shard-1", "node": find_node_id(gateway, "node-1")})
    assert everywhere == {"toy-shard-1": "offline", "toy-shard-2": "online"}
    assert caught.value.code == "node_offline"


def find_node_id(gateway, name: str) -> int:
    return next(node["id"] for node in gateway.connected_nodes() if node["name"] == name)
