"""Repeated deliveries of one (job_id, attempt) run once and get one reply."""

from __future__ import annotations

import torch

from nodeagent.jobs import DeliveryRecord
from nodeagent.testing import (
    FakeGateway,
    GatewaySession,
    make_agent,
    mlp,
    running,
    sha256_of,
)


async def replies_until(session: GatewaySession, job_id: str) -> list:
    """Return the header of every reply received up to the one for ``job_id``."""
    replies = []
    while True:
        message = await session.receive()
        header = message[0] if isinstance(message, tuple) else message
        replies.append(header)
        if header.get("job_id") == job_id:
            return replies


def test_record_rejects_repeat():
    record = DeliveryRecord()

    first = record.add("job-1", 1)
    repeat = record.add("job-1", 1)
    next_attempt = record.add("job-1", 2)

    assert first is True
    assert repeat is False
    assert next_attempt is True
    assert len(record) == 2


def test_record_forgets_oldest():
    record = DeliveryRecord(capacity=2)
    for job_id in ("a", "b", "c"):
        record.add(job_id, 1)

    assert len(record) == 2
    assert record.add("c", 1) is False
    assert record.add("a", 1) is True


async def test_duplicate_request_one_reply(tmp_path, caplog):
    _, archive = mlp()
    # One worker and no batching run requests in arrival order, so a reply to
    # the repeat would arrive before the reply to job-2.
    async with (
        FakeGateway() as gateway,
        running(make_agent(gateway, tmp_path, concurrency=1, batch_window_ms=0)),
    ):
        session = await gateway.next_session()
        sha256 = await session.send_model(archive)
        assert (await session.receive())["type"] == "model.ready"
        inputs = {"input": torch.randn(2, 8)}
        await session.infer(sha256, inputs, job_id="job-1")
        await session.infer(sha256, inputs, job_id="job-1")
        await session.infer(sha256, inputs, job_id="job-2")
        replies = await replies_until(session, "job-2")

    job_1 = [reply for reply in replies if reply["job_id"] == "job-1"]
    assert len(job_1) == 1
    assert job_1[0]["type"] == "infer.result"
    assert len(replies) == 2
    assert "job job-1 attempt 1" in caplog.text
    assert "ignoring a repeated infer.request" in caplog.text


async def test_duplicate_error_one_reply(tmp_path):
    sha256 = sha256_of(b"never placed")
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        session = await gateway.next_session()
        await session.infer(sha256, {"input": torch.randn(1, 8)}, job_id="job-1")
        await session.infer(sha256, {"input": torch.randn(1, 8)}, job_id="job-1")
        await session.infer(sha256, {"input": torch.randn(1, 8)}, job_id="job-2")
        replies = await replies_until(session, "job-2")

    assert [reply["job_id"] for reply in replies] == ["job-1", "job-2"]
    assert replies[0]["type"] == "infer.error"
    assert replies[0]["kind"] == "node"


async def test_new_attempt_runs_again(tmp_path):
    _, archive = mlp()
    async with (
        FakeGateway() as gateway,
        running(make_agent(gateway, tmp_path, concurrency=1, batch_window_ms=0)),
    ):
        session = await gateway.next_session()
        sha256 = await session.send_model(archive)
        assert (await session.receive())["type"] == "model.ready"
        inputs = {"input": torch.randn(2, 8)}
        await session.infer(sha256, inputs, job_id="job-1", attempt=1)
        await session.infer(sha256, inputs, job_id="job-1", attempt=2)
        first, _ = await session.receive()
        second, _ = await session.receive()

    assert first["type"] == "infer.result"
    assert second["type"] == "infer.result"
    assert sorted([first["attempt"], second["attempt"]]) == [1, 2]
