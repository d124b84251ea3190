"""Hostile input against a real gateway process, a worker and one agent.

Oversized bodies and websocket frames must be rejected without the gateway
keeping them in memory, even for a moment. Pickles inside model archives and
inference bodies must never run, names with path parts must not reach the
file system, and a node must not reply for jobs sent to another node. The
limits are set small here so that "over the limit" stays cheap.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import httpx
import psycopg
import pytest
import torch
from safetensors.torch import load, save
from torch import nn
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gridproto import PROTOCOL_VERSION
from gridproto.frames import encode_frame
from tests.e2e import start_network, stop_network
from tests.faults import log_text, tiny_model, wait_for
from tests.models import export_bytes

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
MAX_INFER_BYTES = MIB
MAX_UPLOAD_BYTES = MIB
WS_MAX_BYTES = 4 * MIB
# Growth of the gateway's memory allowed after a burst of rejected input:
# allocator slack and caches, far below the bytes sent.
MEMORY_SLACK = 24 * MIB
SIGNATURE = json.dumps([{"name": "input", "dtype": "float32", "shape": [None, 4]}])
MODEL = "secure-tiny"


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    net = start_network(
        tmp_path_factory.mktemp("security"),
        agents=1,
        # Each inference takes 300 ms, so a job stays running long enough for an intruder to reply to it.
        agent_env={"GRID_AGENT_DELAY_MS": "300"},
        GRID_MAX_INFER_BYTES=str(MAX_INFER_BYTES),
        GRID_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES),
        GRID_WS_MAX_BYTES=str(WS_MAX_BYTES),
        # No other gateway process takes the agent at the end, so do not wait for one.
        GRID_SHUTDOWN_DRAIN="1",
    )
    net.intruder_token = net.stack.manage("createnode", "intruder")
    net.model = tiny_model()
    with net.client() as client:
        client.serve_model(net.model, MODEL, allow_remote_inference=True, replicas=1, example_inputs=torch.rand(2, 4), progress=False)
    yield net
    stop_network(net)


def auth(network) -> dict[str, str]:
    return {"Authorization": f"Bearer {network.token}"}


def memory_kib(network) -> tuple[int, int]:
    """Return the gateway process's resident set and its peak, in KiB."""
    values = {}
    pid = network.stack.processes["gateway"].pid
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def agent_url(network) -> str:
    return network.stack.url.replace("http://", "ws://") + "/ws/agent/"


def chunks(total: int, size: int = MIB):
    """Yield ``total`` zero bytes in pieces, so httpx sends them chunked with no Content-Length."""
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        sent += piece
        yield b"\0" * piece


class RunsCommand:
    """Runs ``touch marker`` when unpickled: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


def replace_entries(archive: bytes, entries: dict[str, bytes]) -> bytes:
    """Return ``archive`` with the entries whose path ends with a key replaced."""
    source = zipfile.ZipFile(io.BytesIO(archive))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            body = next((value for suffix, value in entries.items() if info.filename.endswith(suffix)), None)
            target.writestr(info.filename, source.read(info) if body is None else body)
    return out.getvalue()


def upload(network, model_id: str, data: bytes, filename: str = "model.pt2") -> httpx.Response:
    return httpx.post(
        f"{network.stack.url}/api/models/",
        headers=auth(network),
        data={"model_id": model_id, "input_signature": SIGNATURE, "replicas": "1", "allow_remote_inference": "true"},
        files={"file": (filename, data)},
        timeout=30,
    )


def infer_body(network, body, model_id: str = MODEL, content_type: str = "application/vnd.safetensors") -> httpx.Response:
    return httpx.post(
        f"{network.stack.url}/api/models/{model_id}/infer/",
        headers={**auth(network), "Content-Type": content_type},
        content=body,
        timeout=60,
    )


# Sizes.


def test_oversized_bodies_keep_memory_flat(network):
    for _ in range(2):
        infer_body(network, b"\0" * (2 * MAX_INFER_BYTES))
    rss_before, peak_before = memory_kib(network)

    declared = [infer_body(network, b"\0" * (4 * MAX_INFER_BYTES)) for _ in range(17)]
    chunked = [infer_body(network, chunks(64 * MIB)) for _ in range(3)]
    rss_after, peak_after = memory_kib(network)

    assert [r.status_code for r in declared] == [413] * 17
    assert [r.status_code for r in chunked] == [413] * 3
    assert {r.json()["error"]["code"] for r in declared + chunked} == {"payload_too_large"}
    assert (rss_after - rss_before) * 1024 < MEMORY_SLACK
    # A chunked body read whole would raise the peak by its 64 MiB.
    assert (peak_after - peak_before) * 1024 < MEMORY_SLACK


def test_chunked_upload_ignored(network):
    """A multipart upload without Content-Length is never parsed, so no cap can be dodged."""
    big = export_bytes(nn.Sequential(nn.Linear(512, 600)), torch.rand(2, 512))
    boundary = "gridtestboundary"
    fields = [("model_id", "too-big"), ("input_signature", json.dumps([{"name": "input", "dtype": "float32", "shape": [None, 512]}]))]
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode() for name, value in fields]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.pt2"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode())
    body = b"".join(parts) + big + f"\r\n--{boundary}--\r\n".encode()

    response = httpx.post(
        f"{network.stack.url}/api/models/",
        headers={**auth(network), "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=(body[i : i + 65536] for i in range(0, len(body), 65536)),
        timeout=60,
    )
    listed = httpx.get(f"{network.stack.url}/api/models/too-big/", headers=auth(network), timeout=10)

    assert len(big) > MAX_UPLOAD_BYTES
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "file"
    assert listed.status_code == 404


def close_code(exc: ConnectionClosed) -> int | None:
    return exc.rcvd.code if exc.rcvd is not None else None


def send_frame(network, data: bytes | str) -> int | None:
    """Open an agent socket with the intruder's token, send one frame, return the close code."""
    headers = {"Authorization": f"Bearer {network.intruder_token}"}
    with connect(agent_url(network), additional_headers=headers, compression=None, max_size=None) as socket:
        try:
            socket.send(data)
            socket.recv(timeout=10)
        except ConnectionClosed as exc:
            return close_code(exc)
        try:
            socket.recv(timeout=10)
        except ConnectionClosed as exc:
            return close_code(exc)
    return None


def send_oversized(network, opcode: int) -> tuple[int | None, float]:
    """Announce a frame over the limit, send 1 MiB of it, and return the close code and the wait.

    The rest of the frame is never sent: a receiver that buffered frames
    before checking their size would wait for it instead of closing.
    """
    headers = {"Authorization": f"Bearer {network.intruder_token}"}
    with connect(agent_url(network), additional_headers=headers, compression=None) as socket:
        length = WS_MAX_BYTES + MIB
        # FIN and the opcode, then the mask bit with a 64-bit length, then the masking key.
        header = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack(">Q", length) + os.urandom(4)
        socket.socket.sendall(header + b"\0" * MIB)
        started = time.monotonic()
        try:
            socket.recv(timeout=10)
        except ConnectionClosed as exc:
            return close_code(exc), time.monotonic() - started
        except TimeoutError:
            pass
    return None, time.monotonic() - started


def test_oversized_frames_close_1009(network):
    send_oversized(network, 0x2)
    rss_before, peak_before = memory_kib(network)

    binary = [send_oversized(network, 0x2) for _ in range(10)]
    text = [send_oversized(network, 0x1) for _ in range(10)]
    rss_after, peak_after = memory_kib(network)

    # Each closed socket's consumer must end too, not linger until the process exits.
    log = wait_for(lambda: (seen := log_text(network, "gateway")).count("(intruder) connected") == seen.count("(intruder) disconnected") and seen, "every intruder consumer ended", timeout=15)

    assert [code for code, _ in binary] == [1009] * 10
    assert [code for code, _ in text] == [1009] * 10
    assert max(seconds for _, seconds in binary + text) < 5
    assert (rss_after - rss_before) * 1024 < MEMORY_SLACK
    assert (peak_after - peak_before) * 1024 < MEMORY_SLACK
    assert log.count("(intruder) disconnected") >= 21


def test_large_invalid_frames_rejected(network):
    """Frames under the size limit but malformed close the socket before hello with 4400."""
    rss_before, _ = memory_kib(network)

    codes = [
        send_frame(network, "{" * (2 * MIB)),
        send_frame(network, json.dumps({"type": "hello", "protocol": "1", "pad": "x" * MIB})),
        send_frame(network, b"\xff\xff\xff\xff" + b"\0" * MIB),
        send_frame(network, encode_frame({"type": "infer.result", "job_id": "x", "attempt": 1}, b"\0" * MIB)),
        send_frame(network, "not json"),
    ]
    rss_after, _ = memory_kib(network)

    assert codes == [4400] * 5
    assert (rss_after - rss_before) * 1024 < MEMORY_SLACK


# Pickles.


def test_pickle_inside_archive_never_runs(network, tmp_path):
    """Sample inputs that torch would unpickle reach the agent, which never loads them."""
    marker = tmp_path / "sample-inputs-ran"
    payload = io.BytesIO()
    torch.save(RunsCommand(marker), payload)
    archive = replace_entries(export_bytes(), {"data/sample_inputs/model.pt": payload.getvalue()})

    response = upload(network, "pickled-samples", archive)
    state = wait_for(
        lambda: (body := httpx.get(f"{network.stack.url}/api/models/pickled-samples/", headers=auth(network), timeout=10).json())["status"] != "placing" and body,
        "placement ended",
    )
    reply = infer_body(network, save({"input": torch.ones(1, 4)}), "pickled-samples")

    assert response.status_code == 201
    assert state["status"] == "ready"
    assert reply.status_code == 200
    assert load(reply.content)["output"].shape == (1, 3)
    assert not marker.exists()


def test_pickled_weights_rejected(network, tmp_path):
    marker = tmp_path / "weights-ran"
    archive = export_bytes()
    config = zipfile.ZipFile(io.BytesIO(archive)).read("archive/data/weights/model_weights_config.json")
    weight = io.BytesIO()
    torch.save(RunsCommand(marker), weight)
    tampered = replace_entries(
        archive,
        {
            "data/weights/model_weights_config.json": config.replace(b'"use_pickle": false', b'"use_pickle": true'),
            "data/weights/weight_0": weight.getvalue(),
        },
    )

    response = upload(network, "pickled-weights", tampered)

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_model"
    assert "stored as a pickle" in response.json()["error"]["message"]
    assert not marker.exists()


def test_pickle_as_inference_body_rejected(network, tmp_path):
    marker = tmp_path / "body-ran"
    payload = io.BytesIO()
    torch.save(RunsCommand(marker), payload)

    replies = [
        infer_body(network, payload.getvalue()),
        infer_body(network, payload.getvalue(), content_type="application/octet-stream"),
    ]
    time.sleep(0.5)

    assert [r.status_code for r in replies] == [400, 400]
    assert {r.json()["error"]["code"] for r in replies} == {"invalid_input"}
    assert "not safetensors" in replies[0].json()["error"]["message"]
    assert not marker.exists()


# Names with path parts.


def test_upload_filename_not_used_on_disk(network):
    staging = Path(network.stack.env["GRID_STAGING_DIR"])
    escapes = [staging.parent / "x.pt2", staging.parent.parent / "x.pt2", staging / "x.pt2"]

    response = upload(network, "traversal-name", export_bytes(), filename="../../x.pt2")
    wait_for(lambda: httpx.get(f"{network.stack.url}/api/models/traversal-name/", headers=auth(network), timeout=10).json()["status"] != "placing", "placement ended")

    assert response.status_code == 201
    assert [path for path in escapes if path.exists()] == []
    assert [p.name for p in staging.iterdir() if not p.name.endswith((".pt2", ".part"))] == []


@pytest.mark.parametrize("model_id", ["../x", "..", "a/../../b", "x\\..\\y", "<b>x</b>"])
def test_upload_model_id_with_path_rejected(network, model_id):
    response = upload(network, model_id, export_bytes())

    assert response.status_code == 400
    assert response.json()["error"]["field"] == "model_id"


@pytest.mark.parametrize("path", ["..%2Fx", "%2e%2e", "..%2F..%2Fetc%2Fpasswd", "%00"])
def test_model_path_traversal_not_found(network, path):
    for suffix in ("/", "/infer/", "/nodes/", "/download/"):
        url = httpx.URL(f"{network.stack.url}/api/models/{path}{suffix}")
        method = "POST" if suffix == "/infer/" else "GET"
        response = httpx.request(method, url, headers=auth(network), timeout=10)

        assert response.status_code in (400, 404), (path, suffix)
        assert response.json()["error"]["code"] in ("not_found", "invalid_input"), (path, suffix)


# A node replying for another node's job.


def intruder_hello(name: str) -> str:
    return json.dumps(
        {"type": "hello", "protocol": PROTOCOL_VERSION, "name": name, "capabilities": {}, "concurrency": 1, "models": []}
    )


def running_job(network) -> tuple[str, int] | None:
    with psycopg.connect(network.database_url) as conn:
        return conn.execute("SELECT id::text, attempts FROM inference_inferencejob WHERE status = 'running' LIMIT 1").fetchone()


def test_answer_for_foreign_job_ignored(network):
    inputs = torch.rand(1, 4)
    with torch.inference_mode():
        expected = network.model(inputs)
    with psycopg.connect(network.database_url) as conn:
        real_node = conn.execute("SELECT id FROM registry_node WHERE name = 'node-1'").fetchone()[0]
    headers = {"Authorization": f"Bearer {network.intruder_token}"}
    replies = []
    worker = threading.Thread(target=lambda: replies.append(infer_body(network, save({"input": inputs}))))

    with connect(agent_url(network), additional_headers=headers, compression=None) as socket:
        # The hello names node-1, but the token decides which node this socket is.
        socket.send(intruder_hello("node-1"))
        welcome = json.loads(socket.recv(timeout=10))
        worker.start()
        job_id, attempt = wait_for(lambda: running_job(network), "a job running on node-1", interval=0.01)
        forged = save({"output": torch.full((1, 3), 666.0)})
        socket.send(encode_frame({"type": "infer.result", "job_id": job_id, "attempt": attempt, "elapsed_ms": 1.0}, forged))
        socket.send(json.dumps({"type": "infer.error", "job_id": job_id, "attempt": attempt, "kind": "model", "error": "forged"}))
        worker.join(timeout=30)
    with psycopg.connect(network.database_url) as conn:
        status, node_id, error = conn.execute("SELECT status, node_id, error FROM inference_inferencejob WHERE id = %s", (job_id,)).fetchone()

    assert welcome["node_id"] != real_node
    assert replies[0].status_code == 200
    assert torch.allclose(load(replies[0].content)["output"], expected, atol=1e-5)
    assert replies[0].headers["X-Grid-Node"] == "node-1"
    assert status == "succeeded"
    assert node_id == real_node
    assert error == ""
    assert log_text(network, "gateway").count(f"answered job {job_id} attempt {attempt}, which was not sent to it; ignored") == 2
