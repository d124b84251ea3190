"""The node agent against a fake gateway on 127.0.0.1, over real websockets."""

from __future__ import annotations

import asyncio
import io
import pickle
import zipfile
from pathlib import Path

import safetensors.torch
import torch

from nodeagent.backoff import Backoff
from nodeagent.config import AgentConfig, agent_endpoint
from nodeagent.connection import Agent, Outcome
from nodeagent.testing import (
    FakeGateway,
    GatewaySession,
    mlp,
    running,
    sha256_of,
    two_inputs,
)

TOKEN = "node-secret-token"


def make_agent(gateway: FakeGateway, data_dir: Path, **settings: int) -> Agent:
    config = AgentConfig(
        endpoint=agent_endpoint(gateway.url),
        token=TOKEN,
        name="node-a",
        data_dir=data_dir,
        **settings,
    )
    return Agent(config, backoff=Backoff(base=0.05, cap=0.2))


async def place(session: GatewaySession, data: bytes) -> dict:
    await session.send_model(data)
    return await session.receive()


class MarkerPayload:
    """Creates ``path`` when unpickled: proof that a pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def with_sample_inputs(archive: bytes, payload: bytes) -> bytes:
    """Return ``archive`` with its sample-input entry replaced by ``payload``."""
    source = zipfile.ZipFile(io.BytesIO(archive))
    output = io.BytesIO()
    with zipfile.ZipFile(output, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info)
            if "/data/sample_inputs/" in info.filename:
                data = payload
            target.writestr(info.filename, data)
    return output.getvalue()


async def test_hello_contents(tmp_path):
    async with (
        FakeGateway() as gateway,
        running(make_agent(gateway, tmp_path, concurrency=3)),
    ):
        session = await gateway.next_session()

    hello = session.hello
    assert hello["type"] == "hello"
    assert hello["protocol"] == 1
    assert hello["name"] == "node-a"
    assert hello["concurrency"] == 3
    assert hello["models"] == []
    assert hello["capabilities"]["torch"] == torch.__version__
    assert hello["capabilities"]["device"] == "cpu"
    assert hello["capabilities"]["cpu_count"] >= 1
    assert hello["capabilities"]["memory_bytes"] > 0
    assert gateway.request_paths == ["/ws/agent/"]
    assert gateway.request_headers[0]["Authorization"] == f"Bearer {TOKEN}"
    assert "permessage-deflate" not in gateway.request_headers[0].get(
        "Sec-WebSocket-Extensions", ""
    )


async def test_heartbeats_during_slow_inference(tmp_path):
    _, archive = mlp()
    async with FakeGateway(heartbeat_interval=0.1) as gateway:
        agent = make_agent(gateway, tmp_path, inference_delay_ms=1000)
        async with running(agent):
            session = await gateway.next_session()
            sha256 = await session.send_model(archive)
            assert (await session.receive())["type"] == "model.ready"

            sent = asyncio.get_running_loop().time()
            await session.infer(sha256, {"input": torch.randn(2, 8)})
            header, _ = await session.receive()
            answered = asyncio.get_running_loop().time()

    during = [h for h in session.heartbeats if sent < h.received_at < answered]
    assert header["type"] == "infer.result"
    assert header["elapsed_ms"] >= 1000
    assert len(during) >= 5
    assert max(h.message["in_flight"] for h in during) == 1
    assert [h.message["seq"] for h in session.heartbeats] == list(
        range(1, len(session.heartbeats) + 1)
    )


async def test_transfer_then_inference(tmp_path):
    module, archive = mlp()
    inputs = torch.randn(5, 8)
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        session = await gateway.next_session()
        sha256 = await session.send_model(archive, chunk_bytes=1000)
        ready = await session.receive()
        await session.infer(sha256, {"input": inputs}, job_id="job-7", attempt=2)
        header, body = await session.receive()

    outputs = safetensors.torch.load(body)
    assert len(archive) > 1000 * 3
    assert ready == {"type": "model.ready", "sha256": sha256}
    assert (tmp_path / "models" / f"{sha256}.pt2").read_bytes() == archive
    assert header["type"] == "infer.result"
    assert header["job_id"] == "job-7"
    assert header["attempt"] == 2
    assert list(outputs) == ["output"]
    assert torch.allclose(outputs["output"], module(inputs))


async def test_outputs_in_input_order(tmp_path):
    module, archive = two_inputs()
    a, b = torch.randn(3, 4), torch.randn(3, 2)
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        session = await gateway.next_session()
        sha256 = await session.send_model(archive)
        assert (await session.receive())["type"] == "model.ready"
        await session.infer(sha256, {"b": b, "a": a})
        header, body = await session.receive()

    outputs = safetensors.torch.load(body)
    expected = module(a, b)
    assert header["type"] == "infer.result"
    assert sorted(outputs) == ["output_0", "output_1"]
    assert torch.allclose(outputs["output_0"], expected[0])
    assert torch.allclose(outputs["output_1"], expected[1])


async def test_sha256_mismatch_fails(tmp_path):
    _, archive = mlp()
    wrong = sha256_of(b"something else")
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        session = await gateway.next_session()
        await session.send_model(archive, sha256=wrong)
        failed = await session.receive()

    assert failed["type"] == "model.failed"
    assert failed["sha256"] == wrong
    assert (
        failed["error"]
        == f"sha256 mismatch: the received bytes hash to {sha256_of(archive)}"
    )
    assert list((tmp_path / "models").glob("*.pt2")) == []
    assert list((tmp_path / "models" / ".incoming").iterdir()) == []


async def test_pickle_offer_never_runs(tmp_path):
    marker = tmp_path / "pickle-ran"
    payload = pickle.dumps(MarkerPayload(marker))
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        session = await gateway.next_session()
        await session.send_model(payload)
        failed = await session.receive()

    assert failed["type"] == "model.failed"
    assert "not an exported program" in failed["error"]
    assert not marker.exists()
    assert list((tmp_path / "models").glob("*.pt2")) == []


async def test_torch_save_offer_fails(tmp_path):
    marker = tmp_path / "pickle-ran"
    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(2), "hook": MarkerPayload(marker)}, buffer)
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        session = await gateway.next_session()
        await session.send_model(buffer.getvalue())
        failed = await session.receive()

    assert failed["type"] == "model.failed"
    assert "never contains" in failed["error"]
    assert not marker.exists()


async def test_sample_input_pickle_never_runs(tmp_path):
    # torch.export.load unpickles the sample-input entry with weights_only=False
    # when the safe load fails, so this archive would run the payload there.
    module, archive = mlp()
    marker = tmp_path / "pickle-ran"
    payload = io.BytesIO()
    torch.save(MarkerPayload(marker), payload)
    crafted = with_sample_inputs(archive, payload.getvalue())
    inputs = torch.randn(2, 8)
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        session = await gateway.next_session()
        sha256 = await session.send_model(crafted)
        ready = await session.receive()
        await session.infer(sha256, {"input": inputs})
        header, body = await session.receive()

    assert ready == {"type": "model.ready", "sha256": sha256}
    assert not marker.exists()
    assert header["type"] == "infer.result"
    assert torch.allclose(safetensors.torch.load(body)["output"], module(inputs))


async def test_model_raises_kind_model(tmp_path):
    _, archive = mlp()
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        session = await gateway.next_session()
        sha256 = await session.send_model(archive)
        assert (await session.receive())["type"] == "model.ready"
        await session.infer(sha256, {"input": torch.randn(2, 9)}, job_id="job-9")
        error = await session.receive()

    assert error["type"] == "infer.error"
    assert error["job_id"] == "job-9"
    assert error["attempt"] == 1
    assert error["kind"] == "model"
    assert "to be equal to 8, but got 9" in error["error"]


async def test_bad_input_body_kind_model(tmp_path):
    _, archive = mlp()
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        session = await gateway.next_session()
        sha256 = await session.send_model(archive)
        assert (await session.receive())["type"] == "model.ready"
        await session.send_frame(
            {
                "type": "infer.request",
                "job_id": "job-3",
                "attempt": 1,
                "sha256": sha256,
            },
            b"not safetensors",
        )
        error = await session.receive()

    assert error["type"] == "infer.error"
    assert error["kind"] == "model"
    assert error["error"].startswith("invalid input body:")


async def test_unknown_model_kind_node(tmp_path):
    sha256 = sha256_of(b"never placed")
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        session = await gateway.next_session()
        await session.infer(sha256, {"input": torch.randn(2, 8)}, job_id="job-4")
        error = await session.receive()

    assert error["type"] == "infer.error"
    assert error["job_id"] == "job-4"
    assert error["kind"] == "node"
    assert error["error"] == f"model {sha256} is not loaded on this node"


async def test_held_model_ready_at_once(tmp_path):
    _, archive = mlp()
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        session = await gateway.next_session()
        sha256 = await session.send_model(archive)
        first = await session.receive()
        # The second transfer's chunks are garbage; the agent must skip them.
        await session.send_model(b"x" * len(archive), sha256=sha256)
        second = await session.receive()
        await session.infer(sha256, {"input": torch.randn(1, 8)})
        header, _ = await session.receive()

    assert first == {"type": "model.ready", "sha256": sha256}
    assert second == {"type": "model.ready", "sha256": sha256}
    assert header["type"] == "infer.result"
    assert (tmp_path / "models" / f"{sha256}.pt2").read_bytes() == archive


async def test_evict_deletes_model(tmp_path):
    _, archive = mlp()
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        session = await gateway.next_session()
        sha256 = await session.send_model(archive)
        assert (await session.receive())["type"] == "model.ready"
        await session.send_json({"type": "model.evict", "sha256": sha256})
        evicted = await session.receive()
        await session.infer(sha256, {"input": torch.randn(1, 8)})
        error = await session.receive()

    assert evicted == {"type": "model.evicted", "sha256": sha256}
    assert not (tmp_path / "models" / f"{sha256}.pt2").exists()
    assert error["kind"] == "node"


async def test_offset_gap_fails(tmp_path):
    _, archive = mlp()
    sha256 = sha256_of(archive)
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        session = await gateway.next_session()
        await session.send_json(
            {
                "type": "model.offer",
                "sha256": sha256,
                "size": len(archive),
                "model_id": "m",
            }
        )
        chunk = {"type": "model.chunk", "sha256": sha256, "final": False}
        await session.send_frame({**chunk, "offset": 0}, archive[:100])
        await session.send_frame({**chunk, "offset": 200}, archive[200:300])
        await session.send_frame({**chunk, "offset": 300, "final": True}, archive[300:])
        failed = await session.receive()
        await asyncio.sleep(0.2)
        later = session.messages.qsize()

    assert failed["type"] == "model.failed"
    assert (
        failed["error"]
        == "chunk at offset 200 does not follow the 100 bytes received so far"
    )
    assert later == 0
    assert list((tmp_path / "models" / ".incoming").iterdir()) == []


async def test_short_transfer_fails(tmp_path):
    _, archive = mlp()
    sha256 = sha256_of(archive)
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        session = await gateway.next_session()
        await session.send_json(
            {
                "type": "model.offer",
                "sha256": sha256,
                "size": len(archive),
                "model_id": "m",
            }
        )
        await session.send_frame(
            {"type": "model.chunk", "sha256": sha256, "offset": 0, "final": True},
            archive[:-10],
        )
        failed = await session.receive()

    assert failed["type"] == "model.failed"
    assert failed["error"] == (
        f"transfer ended after {len(archive) - 10} bytes, but the offer announced "
        f"{len(archive)} bytes"
    )


async def test_traversal_sha256_fails(tmp_path):
    data_dir = tmp_path / "data"
    name = "../../escaped"
    async with FakeGateway() as gateway, running(make_agent(gateway, data_dir)):
        session = await gateway.next_session()
        await session.send_model(b"payload", sha256=name)
        failed = await session.receive()

    assert failed["type"] == "model.failed"
    assert failed["sha256"] == name
    assert failed["error"].startswith("invalid sha256")
    assert not (tmp_path / "escaped.part").exists()
    assert not (tmp_path / "escaped.pt2").exists()


async def test_reconnect_after_drop(tmp_path):
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        first = await gateway.next_session()
        await first.websocket.close(1011, "gateway crashed")
        second = await gateway.next_session()

    assert second.hello["name"] == "node-a"
    assert gateway.connections == 2


async def test_reconnect_after_supersede(tmp_path):
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)) as task:
        first = await gateway.next_session()
        await first.websocket.close(4409, "superseded")
        second = await gateway.next_session()

    assert second.hello["type"] == "hello"
    assert task.result() is Outcome.STOPPED


async def test_disconnect_stops_agent(tmp_path):
    async with FakeGateway() as gateway:
        agent = make_agent(gateway, tmp_path)
        task = asyncio.create_task(agent.run())
        session = await gateway.next_session()
        await session.send_json(
            {"type": "disconnect", "reason": "requested by an operator"}
        )
        outcome = await asyncio.wait_for(task, 10)
        close_code = await session.wait_closed()
        await asyncio.sleep(0.5)

    assert outcome is Outcome.DISCONNECTED
    assert close_code == 1000
    assert gateway.connections == 1


async def test_stop_sends_bye(tmp_path):
    async with FakeGateway() as gateway:
        agent = make_agent(gateway, tmp_path)
        task = asyncio.create_task(agent.run())
        session = await gateway.next_session()
        agent.stop()
        outcome = await asyncio.wait_for(task, 10)
        bye = await session.receive()
        close_code = await session.wait_closed()

    assert outcome is Outcome.STOPPED
    assert bye == {"type": "bye", "reason": "shutting down"}
    assert close_code == 1000


async def test_restart_reports_held_models(tmp_path):
    _, first_archive = mlp()
    _, second_archive = two_inputs()
    async with FakeGateway() as gateway:
        async with running(make_agent(gateway, tmp_path)):
            session = await gateway.next_session()
            for archive in (first_archive, second_archive):
                await session.send_model(archive)
                assert (await session.receive())["type"] == "model.ready"

        async with running(make_agent(gateway, tmp_path)):
            restarted = await gateway.next_session()
            await restarted.infer(
                sha256_of(first_archive), {"input": torch.randn(1, 8)}
            )
            header, _ = await restarted.receive()

    expected = sorted(
        [
            {"sha256": sha256_of(first_archive), "size": len(first_archive)},
            {"sha256": sha256_of(second_archive), "size": len(second_archive)},
        ],
        key=lambda model: model["sha256"],
    )
    assert restarted.hello["models"] == expected
    assert header["type"] == "infer.result"


async def test_restart_deletes_corrupt_model(tmp_path):
    _, archive = mlp()
    models = tmp_path / "models"
    models.mkdir()
    good = models / f"{sha256_of(archive)}.pt2"
    good.write_bytes(archive)
    corrupt = models / f"{sha256_of(b'other bytes')}.pt2"
    corrupt.write_bytes(archive)
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)):
        session = await gateway.next_session()

    assert session.hello["models"] == [
        {"sha256": sha256_of(archive), "size": len(archive)}
    ]
    assert good.exists()
    assert not corrupt.exists()


async def test_oversized_output_kind_model(tmp_path):
    _, archive = mlp()
    async with FakeGateway(max_frame_bytes=1024) as gateway:
        async with running(make_agent(gateway, tmp_path)):
            session = await gateway.next_session()
            sha256 = await session.send_model(archive)
            assert (await session.receive())["type"] == "model.ready"
            # 100 rows of 3 float32 outputs make more than 1024 bytes.
            await session.infer(sha256, {"input": torch.randn(100, 8)}, job_id="big")
            error = await session.receive()
            await session.infer(sha256, {"input": torch.randn(1, 8)}, job_id="small")
            header, _ = await session.receive()

    assert error["type"] == "infer.error"
    assert error["kind"] == "model"
    assert "over the gateway's frame limit of 1024 bytes" in error["error"]
    assert header["type"] == "infer.result"


async def test_protocol_error_retried(tmp_path, caplog):
    reply = {
        "type": "error",
        "code": "protocol",
        "message": "protocol 1 is not supported",
    }
    async with FakeGateway(hello_reply=reply) as gateway:
        async with running(make_agent(gateway, tmp_path)):
            for _ in range(50):
                if gateway.connections >= 2:
                    break
                await asyncio.sleep(0.05)

    assert gateway.connections >= 2
    assert "gateway error protocol: protocol 1 is not supported" in caplog.text


async def test_oversized_frame_closes_1009(tmp_path):
    limit = 2 * 1024 * 1024
    async with (
        FakeGateway() as gateway,
        running(make_agent(gateway, tmp_path, ws_max_bytes=limit)),
    ):
        first = await gateway.next_session()
        await first.send_frame({"type": "model.chunk"}, b"\0" * (limit + 1))
        close_code = await first.wait_closed()
        second = await gateway.next_session()

    assert close_code == 1009
    assert second.hello["type"] == "hello"
