"""Parallel batches: order, the in-flight limit, lazy encoding, keys and verify=2."""

import asyncio
import json
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
import safetensors.numpy

import gridclient as gr
import gridclient.tensors
from gridclient.core import Gather
from gridclient.parallel import gather_in_tasks

URL = "http://gateway.test"
MODEL = {
    "model_id": "digits",
    "status": "ready",
    "input_signature": [{"name": "x", "dtype": "float32", "shape": [None, 1, 8, 8]}],
}
# A fixed linear "model" from 64 pixels to 10 logits.
WEIGHTS = np.random.default_rng(7).standard_normal((64, 10)).astype(np.float32)


def digits(count: int) -> np.ndarray:
    return np.random.default_rng(1).random((count, 1, 8, 8), dtype=np.float32)


def logits(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), 64) @ WEIGHTS


def model_response() -> httpx.Response:
    return httpx.Response(200, json=MODEL)


def infer_response(request: httpx.Request) -> httpx.Response:
    images = safetensors.numpy.load(request.read())["x"]
    body = safetensors.numpy.save({"output": logits(images)})
    return httpx.Response(200, content=body, headers={"X-Grid-Node": "node-a"})


class CountingEncode:
    """Wraps tensors.encode to count encoded chunks whose response has not arrived."""

    def __init__(self, encode):
        self.encode = encode
        self.lock = threading.Lock()
        self.live = 0
        self.max_live = 0

    def __call__(self, arrays):
        with self.lock:
            self.live += 1
            self.max_live = max(self.max_live, self.live)
        return self.encode(arrays)

    def responded(self):
        with self.lock:
            self.live -= 1


class ThreadedGateway:
    """Counts inference requests in flight, and delays the first ``limit`` of them
    until ``limit`` are in flight together, so a client that sends fewer at
    once fails the test instead of passing by luck of timing. The first round
    then stays a further GRACE seconds, in which a client that sends more
    than ``limit`` at once shows it.
    """

    GRACE = 0.2

    def __init__(self, limit: int, encoded: CountingEncode | None = None):
        self.limit = limit
        self.encoded = encoded
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.arrived = 0
        self.full = threading.Event()
        self.keys: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return model_response()
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.arrived += 1
            self.keys.append(request.headers["Idempotency-Key"])
            if self.arrived == self.limit:
                self.full.set()
            first_round = self.arrived <= self.limit
        if first_round:
            self.full.wait(timeout=10)
            time.sleep(self.GRACE)
        try:
            return infer_response(request)
        finally:
            with self.lock:
                self.in_flight -= 1
            if self.encoded is not None:
                self.encoded.responded()


def test_10000_digits_parallel(monkeypatch):
    encoded = CountingEncode(gridclient.tensors.encode)
    monkeypatch.setattr(gridclient.tensors, "encode", encoded)
    gateway = ThreadedGateway(limit=4, encoded=encoded)
    images = digits(10_000)
    with gr.GridNetwork(URL, transport=httpx.MockTransport(gateway)) as client:
        result, info = client.run_remote_inference_with_info(
            "digits", images, batch_size=500, progress=False
        )

    assert result.shape == (10_000, 10)
    assert np.allclose(result, logits(images), atol=1e-5)
    assert len(info.jobs) == 20
    assert gateway.arrived == 20
    assert gateway.max_in_flight == 4
    assert encoded.max_live <= 4


def test_concurrency_parameter_respected(monkeypatch):
    encoded = CountingEncode(gridclient.tensors.encode)
    monkeypatch.setattr(gridclient.tensors, "encode", encoded)
    gateway = ThreadedGateway(limit=2, encoded=encoded)
    images = digits(1000)
    with gr.GridNetwork(URL, transport=httpx.MockTransport(gateway)) as client:
        result = client.run_remote_inference(
            "digits", images, batch_size=100, concurrency=2, progress=False
        )

    assert np.allclose(result, logits(images), atol=1e-5)
    assert gateway.max_in_flight == 2
    assert encoded.max_live <= 2


def test_each_chunk_own_key():
    gateway = ThreadedGateway(limit=1)
    with gr.GridNetwork(URL, transport=httpx.MockTransport(gateway)) as client:
        client.run_remote_inference("digits", digits(50), batch_size=10)

    assert len(gateway.keys) == 5
    assert len(set(gateway.keys)) == 5
    assert all(uuid.UUID(key).version == 4 for key in gateway.keys)


async def test_async_10000_digits_parallel():
    in_flight = 0
    max_in_flight = 0
    arrived = 0
    full = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, max_in_flight, arrived
        if request.method == "GET":
            return model_response()
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        arrived += 1
        if arrived == 4:
            full.set()
        try:
            if arrived <= 4:
                await asyncio.wait_for(full.wait(), timeout=10)
            return infer_response(request)
        finally:
            in_flight -= 1

    images = digits(10_000)
    transport = httpx.MockTransport(handler)
    async with gr.AsyncGridNetwork(URL, transport=transport) as client:
        result = await client.run_remote_inference(
            "digits", images, batch_size=500, progress=False
        )

    assert result.shape == (10_000, 10)
    assert np.allclose(result, logits(images), atol=1e-5)
    assert arrived == 20
    assert max_in_flight == 4


def test_chunk_error_raises_typed():
    def handler(request):
        if request.method == "GET":
            return model_response()
        images = safetensors.numpy.load(request.read())["x"]
        if images[0, 0, 0, 0] == -1.0:
            error = {"error": {"code": "model_error", "message": "bad row"}}
            return httpx.Response(422, content=json.dumps(error).encode())
        return infer_response(request)

    images = digits(100)
    images[60, 0, 0, 0] = -1.0
    client = gr.GridNetwork(URL, transport=httpx.MockTransport(handler))
    with client, pytest.raises(gr.ModelError) as caught:
        client.run_remote_inference("digits", images, batch_size=10)

    assert caught.value.code == "model_error"
    assert caught.value.message == "bad row"


def test_verify_sent_and_reported():
    seen = []

    def handler(request):
        if request.method == "GET":
            return model_response()
        seen.append(request)
        response = infer_response(request)
        response.headers["X-Grid-Verified-By"] = "node-a,node-b"
        return response

    with gr.GridNetwork(URL, transport=httpx.MockTransport(handler)) as client:
        _, info = client.run_remote_inference_with_info(
            "digits", digits(3), timeout=20, verify=2
        )

    assert dict(seen[0].url.params) == {"timeout": "20", "verify": "2"}
    # Two replicas run one after the other, each with the full timeout.
    assert seen[0].extensions["timeout"]["read"] == 50.0
    assert info.verified_by == ("node-a", "node-b")
    assert info.jobs[0].verified_by == ("node-a", "node-b")


def test_unverified_has_no_nodes():
    seen = []

    def handler(request):
        if request.method == "GET":
            return model_response()
        seen.append(dict(request.url.params))
        return infer_response(request)

    with gr.GridNetwork(URL, transport=httpx.MockTransport(handler)) as client:
        _, info = client.run_remote_inference_with_info("digits", digits(3))

    assert seen == [{"timeout": "30"}]
    assert info.verified_by == ()


def test_verify_mismatch_not_retried():
    posts = []

    def handler(request):
        if request.method == "GET":
            return model_response()
        posts.append(request)
        error = {"error": {"code": "verification_mismatch", "message": "differ"}}
        return httpx.Response(409, content=json.dumps(error).encode())

    client = gr.GridNetwork(URL, transport=httpx.MockTransport(handler))
    with client, pytest.raises(gr.VerificationMismatch):
        client.run_remote_inference("digits", digits(3), verify=2)

    assert len(posts) == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"verify": 3}, "verify must be 1"),
        ({"concurrency": 0}, "concurrency must be at least 1"),
    ],
)
def test_bad_options_raise(options, message):
    requests = []

    def handler(request):
        requests.append(request)
        return model_response()

    client = gr.GridNetwork(URL, transport=httpx.MockTransport(handler))
    with client, pytest.raises(ValueError, match=message):
        client.run_remote_inference("digits", digits(3), **options)

    assert requests == []


async def test_gather_cancels_after_failure():
    started = []
    cancelled = []

    async def run(index):
        started.append(index)
        if index == 0:
            await asyncio.sleep(0)
            raise gr.ModelError("chunk 0 failed", status=422)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(index)
            raise

    gather = Gather(iter(range(10)), limit=3)
    with pytest.raises(gr.ModelError):
        await gather_in_tasks(run, gather)

    assert started == [0, 1, 2]
    assert sorted(cancelled) == [1, 2]
