"""End to end through gridclient: parallel batches, async jobs, verify=2 and retries."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch

import gridclient as gr
from demo.digits import DigitsCNN
from tests.e2e import start_network, stop_network

pytestmark = pytest.mark.e2e

MODEL = "batches-cnn"


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    net = start_network(tmp_path_factory.mktemp("batches"), agents=3)
    torch.manual_seed(5)
    model = DigitsCNN().eval()
    with net.client() as gateway:
        gateway.serve_model(
            model,
            MODEL,
            allow_remote_inference=True,
            replicas=2,
            example_inputs=torch.rand(4, 1, 8, 8),
            progress=False,
        )
        holders = {p.node_name for p in gateway.search_model(MODEL)}
    net.model = model
    net.holders = holders
    yield net
    stop_network(net)


def images(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 1, 8, 8, generator=generator)


def local(network, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return network.model(inputs)


def test_10000_images_match_local(network, record_property):
    inputs = images(10_000, seed=1)
    with network.client() as gateway:
        started = time.monotonic()
        outputs, info = gateway.run_remote_inference_with_info(
            MODEL, inputs, batch_size=500, progress=False
        )
        seconds = time.monotonic() - started
    record_property("seconds_for_10000", round(seconds, 2))
    print(f"10,000 images in 20 chunks of 500, 4 in flight: {seconds:.2f} s")

    assert isinstance(outputs, torch.Tensor)
    assert outputs.shape == (10_000, 10)
    assert torch.allclose(outputs, local(network, inputs), atol=1e-5)
    assert len(info.jobs) == 20
    assert len({job.job_id for job in info.jobs}) == 20
    assert {job.node for job in info.jobs} <= network.holders


def test_async_client_batches(network):
    inputs = images(2_000, seed=2)

    async def run():
        async with gr.AsyncGridNetwork(
            network.stack.url, token=network.token
        ) as gateway:
            return await gateway.run_remote_inference(
                MODEL, inputs, batch_size=250, concurrency=3, progress=False
            )

    outputs = asyncio.run(run())

    assert outputs.shape == (2_000, 10)
    assert torch.allclose(outputs, local(network, inputs), atol=1e-5)


def test_job_result_matches_local(network):
    inputs = images(1_000, seed=3)
    with network.client() as gateway:
        job = gateway.run_remote_inference(MODEL, inputs, wait=False, batch_size=300)
        outputs = job.result(timeout=60)
        status = job.status()

    assert len(job.job_ids) == 4
    assert status == "succeeded"
    assert torch.allclose(outputs, local(network, inputs), atol=1e-5)


def test_verify_two_replicas(network):
    inputs = images(64, seed=4)
    with network.client() as gateway:
        outputs, info = gateway.run_remote_inference_with_info(MODEL, inputs, verify=2)

    assert set(info.verified_by) == network.holders
    assert len(info.verified_by) == 2
    assert torch.allclose(outputs, local(network, inputs), atol=1e-5)


class DropFirstResponse(httpx.HTTPTransport):
    """Lets the first inference request reach the gateway, then loses its response."""

    def __init__(self) -> None:
        super().__init__()
        self.lost_job_id: str | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST" and self.lost_job_id is None:
            response.read()
            response.close()
            self.lost_job_id = response.headers.get("X-Grid-Job-Id", "")
            raise httpx.ReadError("response lost on purpose", request=request)
        return response


def test_lost_response_retry_same_job(network):
    inputs = images(8, seed=5)
    transport = DropFirstResponse()
    with network.client(transport=transport) as gateway:
        outputs, info = gateway.run_remote_inference_with_info(MODEL, inputs)

    assert transport.lost_job_id
    assert info.job_id == transport.lost_job_id
    assert torch.allclose(outputs, local(network, inputs), atol=1e-5)
