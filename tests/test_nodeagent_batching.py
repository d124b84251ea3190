"""Dynamic batching: concurrent requests for one model share a forward pass.

The agents here use a window of 60 s, far longer than any test, and set
max_batch_rows to the rows that the test sends, so a batch runs when it is
full and never because a timer fired. The grouping is then the same on a busy
machine as on an idle one.
"""

from __future__ import annotations

import asyncio
import functools
import io
import time

import safetensors.torch
import torch

from nodeagent.batching import batch_key, run_batch
from nodeagent.models import LoadedModel
from nodeagent.runner import InferenceError, InferenceResult
from nodeagent.testing import (
    WAIT_SECONDS,
    FakeGateway,
    GatewaySession,
    export_archive,
    make_agent,
    running,
)

LONG_WINDOW_MS = 60_000
SHA256 = "cd" * 32


class Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class BatchSum(torch.nn.Module):
    """Sums over dim 0, so its output has one row whatever the batch size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=0, keepdim=True)


@functools.cache
def linear() -> tuple[torch.nn.Module, bytes]:
    torch.manual_seed(1)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    return module, export_archive(module, (torch.randn(2, 4),))


@functools.cache
def embedding() -> tuple[torch.nn.Module, bytes]:
    """Return an embedding of 10 ids; an id of 10 or more raises IndexError."""
    torch.manual_seed(2)
    module = torch.nn.Embedding(10, 4).eval()
    return module, export_archive(module, (torch.zeros(2, 3, dtype=torch.int64),))


@functools.cache
def doubler() -> tuple[torch.nn.Module, bytes]:
    """Return a program whose dims 0 and 1 are both dynamic."""
    module = Doubler().eval()
    dims = {
        0: torch.export.Dim("batch", max=4096),
        1: torch.export.Dim("width", max=64),
    }
    program = torch.export.export(module, (torch.randn(2, 3),), dynamic_shapes=(dims,))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return module, buffer.getvalue()


@functools.cache
def batch_sum() -> tuple[torch.nn.Module, bytes]:
    module = BatchSum().eval()
    return module, export_archive(module, (torch.randn(2, 3),))


async def placed(session: GatewaySession, archive: bytes) -> str:
    sha256 = await session.send_model(archive)
    ready = await session.receive()
    assert ready == {"type": "model.ready", "sha256": sha256}
    return sha256


async def replies(session: GatewaySession, count: int) -> dict[str, tuple]:
    """Return ``count`` replies by job id: (header, outputs) or (error, None)."""
    received = {}
    for _ in range(count):
        message = await session.receive()
        if isinstance(message, tuple):
            header, body = message
            received[header["job_id"]] = (header, safetensors.torch.load(body))
        else:
            received[message["job_id"]] = (message, None)
    return received


async def infer_all(
    session: GatewaySession,
    sha256: str,
    inputs: dict[str, torch.Tensor],
    *,
    name: str = "input",
) -> dict[str, tuple]:
    """Send one request per job id, each with its tensor as input ``name``."""
    for job_id, tensor in inputs.items():
        await session.infer(sha256, {name: tensor}, job_id=job_id)
    return await replies(session, len(inputs))


async def in_flight_reported(session: GatewaySession, count: int) -> None:
    """Return once a heartbeat received from now on reports ``count`` in flight."""
    seen = len(session.heartbeats)
    while not any(h.message["in_flight"] == count for h in session.heartbeats[seen:]):
        await asyncio.sleep(0.05)


def loaded(module: torch.nn.Module, *input_names: str) -> LoadedModel:
    return LoadedModel(sha256=SHA256, size=0, input_names=input_names, module=module)


def body(**tensors: torch.Tensor) -> bytes:
    return safetensors.torch.save(tensors)


async def test_batched_equals_unbatched(tmp_path):
    module, archive = linear()
    torch.manual_seed(3)
    inputs = {f"job-{rows}": torch.randn(rows, 4) for rows in (1, 2, 3)}
    async with FakeGateway() as gateway:
        async with running(make_agent(gateway, tmp_path, batch_window_ms=0)):
            session = await gateway.next_session()
            sha256 = await placed(session, archive)
            alone = await infer_all(session, sha256, inputs)
        batching = make_agent(
            gateway, tmp_path, batch_window_ms=LONG_WINDOW_MS, max_batch_rows=6
        )
        async with running(batching):
            session = await gateway.next_session()
            batched = await infer_all(session, sha256, inputs)

    assert batching.jobs.batcher.batch_sizes == {3: 1}
    for job_id, tensor in inputs.items():
        header, outputs = batched[job_id]
        assert header["type"] == "infer.result"
        assert header["attempt"] == 1
        assert header["elapsed_ms"] > 0
        assert outputs["output"].shape == (tensor.shape[0], 3)
        assert torch.allclose(outputs["output"], alone[job_id][1]["output"], atol=1e-6)
        assert torch.allclose(outputs["output"], module(tensor), atol=1e-6)


async def test_trailing_shapes_not_mixed(tmp_path):
    _, archive = doubler()
    inputs = {
        "narrow-1": torch.randn(2, 3),
        "wide-1": torch.randn(2, 5),
        "narrow-2": torch.randn(2, 3),
        "wide-2": torch.randn(2, 5),
    }
    async with FakeGateway() as gateway:
        agent = make_agent(
            gateway, tmp_path, batch_window_ms=LONG_WINDOW_MS, max_batch_rows=4
        )
        async with running(agent):
            session = await gateway.next_session()
            sha256 = await placed(session, archive)
            received = await infer_all(session, sha256, inputs, name="x")

    assert agent.jobs.batcher.batch_sizes == {2: 2}
    assert agent.jobs.batcher.fallbacks == 0
    for job_id, tensor in inputs.items():
        header, outputs = received[job_id]
        assert header["type"] == "infer.result"
        assert torch.equal(outputs["output"], tensor * 2)


async def test_bad_input_fails_alone(tmp_path):
    module, archive = embedding()
    inputs = {
        "good-1": torch.tensor([[1, 2, 3]]),
        "bad": torch.tensor([[1, 99, 3]]),
        "good-2": torch.tensor([[4, 5, 6]]),
    }
    async with FakeGateway() as gateway:
        agent = make_agent(
            gateway, tmp_path, batch_window_ms=LONG_WINDOW_MS, max_batch_rows=3
        )
        async with running(agent):
            session = await gateway.next_session()
            sha256 = await placed(session, archive)
            received = await infer_all(session, sha256, inputs)

    error, _ = received["bad"]
    assert error["type"] == "infer.error"
    assert error["kind"] == "model"
    assert "index out of range" in error["error"]
    for job_id in ("good-1", "good-2"):
        header, outputs = received[job_id]
        assert header["type"] == "infer.result"
        assert torch.equal(outputs["output"], module(inputs[job_id]))
    assert agent.jobs.batcher.fallbacks == 1
    assert agent.jobs.batcher.batch_sizes == {}


async def test_unsplittable_model_not_batched_again(tmp_path, caplog):
    module, archive = batch_sum()
    first = {"a": torch.randn(1, 3), "b": torch.randn(1, 3)}
    second = {"c": torch.randn(1, 3), "d": torch.randn(1, 3)}
    async with FakeGateway() as gateway:
        agent = make_agent(
            gateway, tmp_path, batch_window_ms=LONG_WINDOW_MS, max_batch_rows=2
        )
        async with running(agent):
            session = await gateway.next_session()
            sha256 = await placed(session, archive)
            received = await infer_all(session, sha256, first, name="x")
            # Batched again, these two would wait for the 60 s window.
            received |= await infer_all(session, sha256, second, name="x")

    for job_id, tensor in {**first, **second}.items():
        header, outputs = received[job_id]
        assert header["type"] == "infer.result"
        assert torch.equal(outputs["output"], module(tensor))
    assert agent.jobs.batcher.unbatchable == {sha256}
    assert agent.jobs.batcher.fallbacks == 1
    assert f"model {sha256}: cannot split a batched pass" in caplog.text


async def test_full_group_runs_before_overflow(tmp_path):
    _, archive = linear()
    inputs = {
        "three": torch.randn(3, 4),
        "two-a": torch.randn(2, 4),
        "two-b": torch.randn(2, 4),
    }
    async with FakeGateway() as gateway:
        agent = make_agent(
            gateway, tmp_path, batch_window_ms=LONG_WINDOW_MS, max_batch_rows=4
        )
        async with running(agent):
            session = await gateway.next_session()
            sha256 = await placed(session, archive)
            # 3 + 2 rows overflow 4, so "three" runs alone at once; the two
            # 2-row requests then fill a group.
            received = await infer_all(session, sha256, inputs)

    assert agent.jobs.batcher.batch_sizes == {2: 1}
    assert [received[job_id][0]["type"] for job_id in inputs] == ["infer.result"] * 3


async def test_large_request_runs_alone(tmp_path):
    module, archive = linear()
    tensor = torch.randn(5, 4)
    async with FakeGateway() as gateway:
        agent = make_agent(
            gateway, tmp_path, batch_window_ms=LONG_WINDOW_MS, max_batch_rows=4
        )
        async with running(agent):
            session = await gateway.next_session()
            sha256 = await placed(session, archive)
            received = await infer_all(session, sha256, {"big": tensor})

    header, outputs = received["big"]
    assert header["type"] == "infer.result"
    assert torch.allclose(outputs["output"], module(tensor), atol=1e-6)
    assert agent.jobs.batcher.batch_sizes == {}


async def test_window_timer_runs_request(tmp_path):
    module, archive = linear()
    tensor = torch.randn(2, 4)
    async with FakeGateway() as gateway:
        agent = make_agent(gateway, tmp_path, batch_window_ms=50)
        async with running(agent):
            session = await gateway.next_session()
            sha256 = await placed(session, archive)
            received = await infer_all(session, sha256, {"only": tensor})

    header, outputs = received["only"]
    assert header["type"] == "infer.result"
    assert torch.allclose(outputs["output"], module(tensor), atol=1e-6)


async def test_heartbeats_count_waiting_requests(tmp_path):
    _, archive = linear()
    async with FakeGateway(heartbeat_interval=0.05) as gateway:
        agent = make_agent(
            gateway, tmp_path, batch_window_ms=LONG_WINDOW_MS, max_batch_rows=3
        )
        async with running(agent):
            session = await gateway.next_session()
            sha256 = await placed(session, archive)
            await session.infer(sha256, {"input": torch.randn(1, 4)}, job_id="a")
            await session.infer(sha256, {"input": torch.randn(1, 4)}, job_id="b")
            await asyncio.wait_for(in_flight_reported(session, 2), WAIT_SECONDS)
            waiting = session.messages.qsize()
            await session.infer(sha256, {"input": torch.randn(1, 4)}, job_id="c")
            received = await replies(session, 3)

    assert waiting == 0
    assert sorted(received) == ["a", "b", "c"]
    assert agent.jobs.batcher.batch_sizes == {3: 1}


def test_key_ignores_row_count():
    model = loaded(Doubler(), "input")

    two = batch_key(model, body(input=torch.zeros(2, 3)))
    five = batch_key(model, body(input=torch.zeros(5, 3)))

    assert two is not None
    assert five is not None
    assert two[0] == five[0]
    assert two[1] == 2
    assert five[1] == 5


def test_key_separates_dtype_and_shape():
    model = loaded(Doubler(), "input")

    base = batch_key(model, body(input=torch.zeros(2, 3)))
    other_dtype = batch_key(model, body(input=torch.zeros(2, 3, dtype=torch.float64)))
    other_shape = batch_key(model, body(input=torch.zeros(2, 4)))
    other_rank = batch_key(model, body(input=torch.zeros(2, 3, 1)))

    assert base is not None
    assert other_dtype is not None and other_dtype[0] != base[0]
    assert other_shape is not None and other_shape[0] != base[0]
    assert other_rank is not None and other_rank[0] != base[0]


def test_key_none_when_unbatchable():
    model = loaded(Doubler(), "a", "b")

    assert batch_key(model, b"not safetensors") is None
    assert batch_key(model, body(a=torch.zeros(2, 3))) is None
    assert batch_key(model, body(a=torch.zeros(2, 3), c=torch.zeros(2, 3))) is None
    assert batch_key(model, body(a=torch.zeros(2, 3), b=torch.zeros(3, 3))) is None
    assert batch_key(model, body(a=torch.zeros(()), b=torch.zeros(()))) is None


def test_delay_once_per_pass(monkeypatch):
    sleeps = []
    monkeypatch.setattr("nodeagent.batching.time.sleep", sleeps.append)
    model = loaded(Doubler(), "input")
    bodies = [body(input=torch.ones(rows, 2)) for rows in (1, 2, 3)]

    outcomes = run_batch(model, bodies, [None] * 3, delay_ms=250)

    assert sleeps == [0.25]
    assert all(isinstance(outcome, InferenceResult) for outcome in outcomes)


def test_batch_splits_rows():
    model = loaded(Doubler(), "input")
    tensors = [torch.randn(rows, 2) for rows in (1, 3)]

    outcomes = run_batch(model, [body(input=t) for t in tensors], [None, None])

    for tensor, outcome in zip(tensors, outcomes):
        assert isinstance(outcome, InferenceResult)
        output = safetensors.torch.load(outcome.body)["output"]
        assert torch.equal(output, tensor * 2)


def test_expired_request_fails_alone():
    model = loaded(Doubler(), "input")
    bodies = [body(input=torch.ones(1, 2)), body(input=torch.ones(2, 2))]

    outcomes = run_batch(model, bodies, [time.monotonic() - 1, None])

    assert isinstance(outcomes[0], InferenceError)
    assert outcomes[0].kind == "node"
    assert str(outcomes[0]) == "the request timed out while queued on the node"
    assert isinstance(outcomes[1], InferenceResult)
