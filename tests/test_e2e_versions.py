"""End to end: a rolling version update under load never mixes versions."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import load, save

from demo.digits import DigitsCNN
from tests.e2e import start_network, stop_network
from tests.models import export_bytes

pytestmark = pytest.mark.e2e

SIGNATURE = json.dumps([{"name": "images", "dtype": "float32", "shape": [None, 1, 8, 8]}])


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    net = start_network(tmp_path_factory.mktemp("versions"), agents=3, GRID_ATTEMPT_TIMEOUT="2")
    yield net
    stop_network(net)


def make_model(seed: int) -> tuple[DigitsCNN, bytes]:
    torch.manual_seed(seed)
    model = DigitsCNN().eval()
    return model, export_bytes(model, torch.rand(2, 1, 8, 8))


def upload(network, data: bytes) -> httpx.Response:
    return httpx.post(
        f"{network.stack.url}/api/models/",
        headers={"Authorization": f"Bearer {network.token}"},
        data={"model_id": "versioned", "input_signature": SIGNATURE, "replicas": "2", "allow_remote_inference": "true"},
        files={"file": ("m.pt2", data)},
        timeout=60,
    )


def model_json(network) -> dict:
    return httpx.get(f"{network.stack.url}/api/models/versioned/", headers={"Authorization": f"Bearer {network.token}"}).json()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_rolling_update_under_load(network):
    old_model, old_bytes = make_model(10)
    new_model, new_bytes = make_model(11)
    old_sha, new_sha = hashlib.sha256(old_bytes).hexdigest(), hashlib.sha256(new_bytes).hexdigest()
    network.versions = (old_sha, new_sha, new_bytes)
    assert upload(network, old_bytes).status_code == 201
    wait_for(lambda: model_json(network)["status"] == "ready", 30, "the first version to be ready")

    images = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    expected = {
        old_sha: old_model(torch.from_numpy(images)).detach().numpy(),
        new_sha: new_model(torch.from_numpy(images)).detach().numpy(),
    }
    responses: list[tuple[int, str, np.ndarray | None]] = []
    stop = threading.Event()

    def send_until_stopped() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                response = client.post(
                    f"{network.stack.url}/api/models/versioned/infer/",
                    content=save({"images": images}),
                    headers={"Authorization": f"Bearer {network.token}", "Content-Type": "application/vnd.safetensors"},
                    timeout=30,
                )
                output = load(response.content)["output"] if response.status_code == 200 else None
                responses.append((response.status_code, response.headers.get("X-Grid-Model-Version", ""), output))

    threads = [threading.Thread(target=send_until_stopped) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        accepted = upload(network, new_bytes)
        assert accepted.status_code == 202
        assert accepted.json()["pending_version"] == new_sha
        wait_for(lambda: model_json(network)["version"] == new_sha, 60, "the new version to become active")
        served_new = len(responses)
        wait_for(lambda: len(responses) > served_new + 20, 30, "requests served after the switch")
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    versions = {version for _, version, _ in responses}
    failures = [(code, version) for code, version, _ in responses if code != 200]
    mixed = [version for _, version, output in responses if output is not None and not np.allclose(output, expected[version], atol=1e-5)]
    assert failures == []
    assert versions == {old_sha, new_sha}
    assert mixed == []
    assert responses[-1][1] == new_sha


def test_old_version_evicted_and_unpinnable(network):
    old_sha, new_sha, _ = network.versions

    def old_version_gone():
        files = [p for p in network.data_root.glob("*/models/*.pt2") if p.stem == old_sha]
        placements = [p for p in model_json(network)["placements"] if p["sha256"] == old_sha]
        return not files and not placements

    wait_for(old_version_gone, 30, "the old version to be evicted")
    response = httpx.post(
        f"{network.stack.url}/api/models/versioned/infer/?version={old_sha[:12]}",
        content=save({"images": np.zeros((1, 1, 8, 8), np.float32)}),
        headers={"Authorization": f"Bearer {network.token}", "Content-Type": "application/vnd.safetensors"},
    )
    assert response.status_code == 404
    assert response.json()["error"]["field"] == "version"


def test_pinned_version_served(network):
    _, new_sha, _ = network.versions
    response = httpx.post(
        f"{network.stack.url}/api/models/versioned/infer/?version={new_sha[:12]}",
        content=save({"images": np.zeros((1, 1, 8, 8), np.float32)}),
        headers={"Authorization": f"Bearer {network.token}", "Content-Type": "application/vnd.safetensors"},
    )
    assert response.status_code == 200
    assert response.headers["X-Grid-Model-Version"] == new_sha


def test_same_file_again_is_409(network):
    _, _, new_bytes = network.versions
    response = upload(network, new_bytes)
    assert response.status_code == 409
    assert "already serves" in response.json()["error"]["message"]
