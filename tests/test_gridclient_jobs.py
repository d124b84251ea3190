"""run_remote_inference(wait=False): job submission, polling, results and errors."""

import json
import uuid

import httpx
import numpy as np
import pytest
import safetensors.numpy
import torch

import gridclient as gr

URL = "http://gateway.test"
MODEL = {
    "model_id": "m1",
    "status": "ready",
    "input_signature": [{"name": "x", "dtype": "float32", "shape": [None, 2]}],
}


def error(status: int, code: str, message: str) -> httpx.Response:
    body = {"error": {"code": code, "message": message, "field": None}}
    return httpx.Response(status, content=json.dumps(body).encode())


class JobsGateway:
    """Serves the jobs API for model m1, whose output is twice its input.

    A job reports "running" to its first ``polls - 1`` status requests and its
    outcome from then on. ``fail`` maps the first input value of a chunk to
    the (status, code) that its job ends with instead of succeeding, because
    chunks submitted in parallel arrive in any order.
    """

    def __init__(self, polls: int = 3, fail: dict | None = None):
        self.polls = polls
        self.fail = fail or {}
        self.jobs: dict[str, dict] = {}
        self.by_key: dict[str, str] = {}
        self.submissions: list[httpx.Request] = []
        self.result_gets: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path == "/api/models/m1/":
            return httpx.Response(200, json=MODEL)
        if request.method == "POST" and path == "/api/jobs/":
            return self.submit(request)
        parts = path.strip("/").split("/")
        job = self.jobs[parts[2]]
        if parts[3:] == ["result"]:
            self.result_gets.append(parts[2])
            return self.result(job)
        job["gets"] += 1
        return httpx.Response(200, json=self.record(job))

    def submit(self, request: httpx.Request) -> httpx.Response:
        self.submissions.append(request)
        key = request.headers["Idempotency-Key"]
        if key in self.by_key:
            return httpx.Response(200, json=self.record(self.jobs[self.by_key[key]]))
        job_id = str(uuid.uuid4())
        inputs = safetensors.numpy.load(request.read())["x"]
        marker = float(inputs[0, 0])
        self.jobs[job_id] = {"id": job_id, "marker": marker, "x": inputs, "gets": 0}
        self.by_key[key] = job_id
        record = self.record(self.jobs[job_id])
        return httpx.Response(202, json=record, headers={"Location": record["url"]})

    def status(self, job: dict) -> str:
        if job["gets"] < self.polls:
            return "running"
        return "failed" if job["marker"] in self.fail else "succeeded"

    def record(self, job: dict) -> dict:
        status = self.status(job)
        data = {
            "job_id": job["id"],
            "url": f"/api/jobs/{job['id']}/",
            "model": "m1",
            "status": status,
            "node": "node-a",
            "attempts": 1,
            "error_code": None,
            "error": None,
        }
        if status == "failed":
            data["error_code"] = self.fail[job["marker"]][1]
            data["error"] = "the model raised"
        if status == "succeeded":
            data["result_url"] = f"/api/jobs/{job['id']}/result/"
        return data

    def result(self, job: dict) -> httpx.Response:
        status = self.status(job)
        if status == "running":
            return error(409, "not_finished", "still running")
        if status == "failed":
            http_status, code = self.fail[job["marker"]]
            return error(http_status, code, "the model raised")
        body = safetensors.numpy.save({"output": job["x"] * 2})
        return httpx.Response(200, content=body)


class Clock:
    """A monotonic clock that only the client's sleeps move forward."""

    def __init__(self):
        self.now = 0.0
        self.delays: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.now += seconds


def client_for(handler, clock: Clock, **options) -> gr.GridNetwork:
    return gr.GridNetwork(
        URL,
        token="tok",
        transport=httpx.MockTransport(handler),
        sleep=clock.sleep,
        clock=clock,
        **options,
    )


def test_job_result_joins_in_order():
    gateway = JobsGateway()
    clock = Clock()
    data = np.arange(20, dtype=np.float32).reshape(10, 2)
    with client_for(gateway, clock) as client:
        job = client.run_remote_inference("m1", data, wait=False, batch_size=3)
        result = job.result()

    assert isinstance(job, gr.Job)
    assert len(job.job_ids) == 4
    assert set(job.job_ids) == set(gateway.jobs)
    assert isinstance(result, np.ndarray)
    assert np.array_equal(result, data * 2)


def test_submission_carries_key_and_params():
    gateway = JobsGateway()
    clock = Clock()
    with client_for(gateway, clock) as client:
        client.run_remote_inference(
            "m1", np.ones((4, 2), np.float32), wait=False, batch_size=2, timeout=12
        )

    keys = [r.headers["Idempotency-Key"] for r in gateway.submissions]
    params = [dict(r.url.params) for r in gateway.submissions]
    assert len(set(keys)) == 2
    assert params == [{"model": "m1", "timeout": "12"}] * 2
    assert gateway.submissions[0].headers["Content-Type"] == (
        "application/vnd.safetensors"
    )


def test_poll_backoff_doubles_to_1s():
    gateway = JobsGateway(polls=10)
    clock = Clock()
    with client_for(gateway, clock) as client:
        job = client.run_remote_inference("m1", np.ones((1, 2), np.float32), wait=False)
        job.result()

    assert clock.delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]


def test_status_and_done():
    gateway = JobsGateway(polls=2)
    clock = Clock()
    with client_for(gateway, clock) as client:
        job = client.run_remote_inference(
            "m1", np.ones((2, 2), np.float32), wait=False, batch_size=1
        )
        first = job.status()
        finished = job.done()
        last = job.status()

    assert first == "running"
    assert finished is True
    assert last == "succeeded"


def test_result_fetched_once():
    gateway = JobsGateway(polls=1)
    clock = Clock()
    with client_for(gateway, clock) as client:
        job = client.run_remote_inference("m1", np.ones((1, 2), np.float32), wait=False)
        first = job.result()
        second = job.result()

    assert second is first
    assert len(gateway.result_gets) == 1


def test_torch_in_torch_out():
    gateway = JobsGateway(polls=1)
    clock = Clock()
    data = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    with client_for(gateway, clock) as client:
        job = client.run_remote_inference("m1", data, wait=False)
        result = job.result()

    assert isinstance(result, torch.Tensor)
    assert result.tolist() == [[2.0, 4.0], [6.0, 8.0]]


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (422, "model_error", gr.ModelError),
        (504, "timeout", gr.GatewayTimeout),
        (503, "no_replica", gr.Unavailable),
    ],
)
def test_failed_job_raises_typed(status, code, cls):
    gateway = JobsGateway(polls=1, fail={1.0: (status, code)})
    clock = Clock()
    # Rows [0, 0], [1, 1], [2, 2]: the second chunk fails.
    data = np.repeat(np.arange(3, dtype=np.float32), 2).reshape(3, 2)
    client = client_for(gateway, clock)
    with client:
        job = client.run_remote_inference("m1", data, wait=False, batch_size=1)
        with pytest.raises(cls) as caught:
            job.result()

    assert caught.value.code == code
    assert caught.value.status == status
    # The error is read once: a 503 here is the job's outcome, not a busy gateway.
    assert gateway.result_gets == [job.job_ids[1]]
    assert clock.delays == []


def test_result_times_out():
    gateway = JobsGateway(polls=1000)
    clock = Clock()
    with client_for(gateway, clock) as client:
        job = client.run_remote_inference("m1", np.ones((1, 2), np.float32), wait=False)
        with pytest.raises(TimeoutError) as caught:
            job.result(timeout=2.5)

    assert job.job_ids[0] in str(caught.value)
    assert clock.now == pytest.approx(2.5)
    assert gateway.result_gets == []


def test_retried_submission_same_job():
    gateway = JobsGateway(polls=1)
    clock = Clock()
    calls = []

    def handler(request):
        calls.append(request)
        response = gateway(request)
        if request.method == "POST" and len(gateway.submissions) == 1:
            # The gateway accepted the job, but the response was lost.
            raise httpx.ReadError("connection reset", request=request)
        return response

    with client_for(handler, clock) as client:
        job = client.run_remote_inference("m1", np.ones((2, 2), np.float32), wait=False)
        result = job.result()

    keys = [r.headers["Idempotency-Key"] for r in gateway.submissions]
    assert len(gateway.jobs) == 1
    assert keys[1] == keys[0]
    assert job.job_ids == tuple(gateway.jobs)
    assert result.tolist() == [[2.0, 2.0], [2.0, 2.0]]


def test_wait_false_rejects_verify():
    clock = Clock()
    client = client_for(JobsGateway(), clock)
    with client, pytest.raises(ValueError, match="verify=2 needs wait=True"):
        client.run_remote_inference(
            "m1", np.ones((1, 2), np.float32), wait=False, verify=2
        )


async def test_async_job_result():
    gateway = JobsGateway(polls=2)
    delays = []

    async def sleep(seconds):
        delays.append(seconds)

    data = np.arange(8, dtype=np.float32).reshape(4, 2)
    transport = httpx.MockTransport(gateway)
    async with gr.AsyncGridNetwork(URL, transport=transport, sleep=sleep) as client:
        job = await client.run_remote_inference(
            "m1", data, wait=False, batch_size=2, concurrency=2
        )
        status = await job.status()
        result = await job.result()
        finished = await job.done()

    assert isinstance(job, gr.AsyncJob)
    assert status == "running"
    assert np.array_equal(result, data * 2)
    assert finished is True
    assert delays == []
