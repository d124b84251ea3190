"""GRID_AGENT_FAULT, the test knobs that make a node lie or crash."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from pathlib import Path

import safetensors.torch
import torch

from nodeagent.faults import shift_outputs
from nodeagent.testing import (
    FakeGateway,
    export_archive,
    make_agent,
    running,
    sha256_of,
)

REPO = Path(__file__).resolve().parents[1]
# Importing torch takes a few seconds in a fresh process.
PROCESS_SECONDS = 60


class FloatAndClass(torch.nn.Module):
    """Returns a float output and an integer one."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x.argmax(dim=1)


@functools.cache
def float_and_class() -> tuple[torch.nn.Module, bytes]:
    module = FloatAndClass().eval()
    return module, export_archive(module, (torch.randn(2, 3),))


def test_shift_adds_one_to_floats():
    tensors = {
        "float": torch.tensor([0.5, -1.0]),
        "half": torch.tensor([2.0], dtype=torch.float16),
        "int": torch.tensor([3, 4]),
        "bool": torch.tensor([True, False]),
    }

    shifted = safetensors.torch.load(shift_outputs(safetensors.torch.save(tensors)))

    assert torch.equal(shifted["float"], torch.tensor([1.5, 0.0]))
    assert torch.equal(shifted["half"], torch.tensor([3.0], dtype=torch.float16))
    assert torch.equal(shifted["int"], tensors["int"])
    assert torch.equal(shifted["bool"], tensors["bool"])


async def test_wrong_outputs_shifts_floats(tmp_path):
    module, archive = float_and_class()
    tensor = torch.randn(3, 3)
    async with FakeGateway() as gateway:
        agent = make_agent(gateway, tmp_path, fault="wrong-outputs")
        async with running(agent):
            session = await gateway.next_session()
            sha256 = await session.send_model(archive)
            assert (await session.receive())["type"] == "model.ready"
            await session.infer(sha256, {"x": tensor})
            header, body = await session.receive()

    outputs = safetensors.torch.load(body)
    doubled, classes = module(tensor)
    assert header["type"] == "infer.result"
    assert torch.allclose(outputs["output_0"], doubled + 1.0)
    assert torch.equal(outputs["output_1"], classes)


async def test_no_fault_by_default(tmp_path):
    _, archive = float_and_class()
    tensor = torch.randn(3, 3)
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        session = await gateway.next_session()
        sha256 = await session.send_model(archive)
        assert (await session.receive())["type"] == "model.ready"
        await session.infer(sha256, {"x": tensor})
        _, body = await session.receive()

    assert torch.allclose(safetensors.torch.load(body)["output_0"], tensor * 2)


async def test_crash_on_infer_exits_1(tmp_path):
    environ = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "GRID_NODE_TOKEN": "node-secret-token",
        "GRID_AGENT_FAULT": "crash-on-infer",
    }
    async with FakeGateway() as gateway:
        environ["GRID_GATEWAY"] = gateway.url
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "nodeagent",
            "--data-dir",
            str(tmp_path),
            env=environ,
            cwd=REPO,
            stderr=asyncio.subprocess.PIPE,
        )
        session = await gateway.next_session(timeout=PROCESS_SECONDS)
        await session.infer(
            sha256_of(b"any model"), {"x": torch.ones(1, 3)}, job_id="job-5"
        )
        _, stderr = await asyncio.wait_for(process.communicate(), PROCESS_SECONDS)
        close_code = await session.wait_closed()

    log = stderr.decode()
    assert process.returncode == 1
    assert close_code == 1006
    assert session.messages.empty()
    assert "GRID_AGENT_FAULT=crash-on-infer is set" in log
    assert "job job-5 attempt 1" in log
    assert "exiting with status 1" in log
