"""docs/tutorial.py runs as written against a real stack: gateway, Celery, two agents."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from gridsite.stack import ROOT
from tests.e2e import start_network, stop_network

pytestmark = pytest.mark.e2e

TUTORIAL = ROOT / "docs" / "tutorial.py"


def add_dataset(data_dir: Path) -> None:
    """Give a node a 20-row dataset tagged digits and test, before its agent starts."""
    folder = data_dir / "datasets"
    folder.mkdir(parents=True)
    tensors = {
        "images": np.zeros((20, 1, 8, 8), np.float32),
        "labels": np.arange(20, dtype=np.int64) % 10,
    }
    save_file(tensors, folder / "digits-test.safetensors")
    manifest = {
        "name": "digits-test",
        "tags": ["digits", "test"],
        "label_tensor": "labels",
    }
    (folder / "digits-test.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tutorial")
    add_dataset(tmp / "nodes" / "node-1")
    net = start_network(tmp, agents=2)
    yield net
    stop_network(net)


def test_tutorial_runs_as_written(network):
    # PYTHONPATH replaces `pip install ./gridclient`, which
    # test_gridclient_install checks on its own.
    env = {
        **os.environ,
        "GRID_URL": network.stack.url,
        "GRID_TOKEN": network.token,
        "PYTHONPATH": str(ROOT),
    }
    run = subprocess.run(
        [sys.executable, str(TUTORIAL)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = run.stdout
    accuracy = re.search(r"remote inference: 360 predictions, accuracy (\d\.\d+)", out)
    assert run.returncode == 0, out + run.stderr[-3000:]
    assert "2 nodes online (node-1, node-2)" in out
    assert re.search(r"served digits-grid-model: ready on node-\d", out)
    assert accuracy is not None, out
    assert float(accuracy.group(1)) >= 0.9
    assert "datasets tagged digits and test: 1 (digits-test@node-1)" in out
    assert "disconnected 2 nodes" in out


def test_tutorial_leaves_nodes_offline(network):
    # The tutorial ends with disconnect_nodes(); this reads the state it left.
    agents = [network.stack.processes[name] for name in ("node-1", "node-2")]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(agent.poll() is None for agent in agents):
        time.sleep(0.1)
    with network.client() as gateway:
        status = {node["name"]: node["status"] for node in gateway.connected_nodes()}
    # A disconnected agent stops with exit code 0 and does not reconnect.
    assert [agent.returncode for agent in agents] == [0, 0]
    assert status == {"node-1": "offline", "node-2": "offline"}
