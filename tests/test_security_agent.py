"""Hostile messages from a gateway to a real agent over a real websocket.

Offers of pickled models and of hashes with path parts are covered in
tests/test_nodeagent_agent.py. Here the inference body is the pickle, and
dataset names try to leave the agent's datasets folder.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import torch

from gridproto.frames import encode_frame
from nodeagent.testing import FakeGateway, make_agent, mlp, running
from tests.test_nodeagent_agent import place
from tests.test_nodeagent_datasets import write_dataset


class RunsCommand:
    """Runs ``touch marker`` when unpickled: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


async def test_pickle_inference_body_never_runs(tmp_path):
    marker = tmp_path / "body-ran"
    payload = io.BytesIO()
    torch.save(RunsCommand(marker), payload)
    _, archive = mlp()
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)) as agent:
        session = await gateway.next_session()
        ready = await place(session, archive)
        header = {"type": "infer.request", "job_id": "job-1", "attempt": 1, "sha256": ready["sha256"], "timeout": 10}
        await session.send_frame(header, payload.getvalue())
        answer = await session.receive()
        await session.infer(ready["sha256"], {"input": torch.ones(2, 8)}, job_id="job-2")
        after, body = await session.receive()
        alive = not agent.done()

    assert answer["type"] == "infer.error"
    assert answer["job_id"] == "job-1"
    assert not marker.exists()
    assert alive
    assert after["type"] == "infer.result"
    assert safetensors.torch.load(body)["output"].shape == (2, 3)


@pytest.mark.parametrize("name", ["../secret", "../outside/secret", "secret/../../secret", "/tmp/secret", "..", "."])
async def test_dataset_name_cannot_leave_folder(tmp_path, name):
    # Valid datasets outside <data-dir>/datasets/: none of them may be read.
    write_dataset(tmp_path, "secret")
    write_dataset(tmp_path / "outside", "secret")
    write_dataset(tmp_path / "datasets", "shard-1")
    _, archive = mlp()
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        session = await gateway.next_session()
        ready = await place(session, archive)
        request = {"type": "infer.dataset", "job_id": "job-1", "attempt": 1, "sha256": ready["sha256"], "dataset": name, "aggregate": True, "timeout": 10}
        await session.send_json(request)
        answer = await session.receive()

    assert [entry["name"] for entry in session.hello["datasets"]] == ["shard-1"]
    assert answer["type"] == "infer.error"
    assert answer["kind"] == "node"
    assert "is not on this node" in answer["error"]


async def test_frame_with_hostile_header_ignored(tmp_path):
    """A binary frame whose header has an unknown type or bad fields leaves the agent serving."""
    _, archive = mlp()
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)) as agent:
        session = await gateway.next_session()
        ready = await place(session, archive)
        await session.websocket.send(b"\x00\x00\x00\x05[1,2]")
        await session.websocket.send(encode_frame({"type": "model.chunk", "sha256": "../../x", "offset": -1, "final": "yes"}, b"x"))
        await session.websocket.send(encode_frame({"type": "infer.request", "job_id": ["x"], "attempt": "1", "sha256": ready["sha256"]}, b"x"))
        await session.infer(ready["sha256"], {"input": torch.ones(1, 8)}, job_id="job-ok")
        answers = []
        while True:
            answer = await session.receive()
            answers.append(answer)
            if isinstance(answer, tuple) and answer[0].get("job_id") == "job-ok":
                break
        alive = not agent.done()

    assert alive
    assert answers[-1][0]["type"] == "infer.result"
    assert [path for path in (tmp_path / "x", tmp_path.parent / "x") if path.exists()] == []
