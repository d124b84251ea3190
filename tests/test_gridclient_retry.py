"""Retries with backoff and Retry-After, and which requests are never retried."""

import email.utils
import json
import time

import httpx
import numpy as np
import pytest
import safetensors.numpy

import gridclient as gr

URL = "http://gateway.test"
TOKEN = "s3cr3t-9f8e7d"
MODEL = {
    "model_id": "m1",
    "status": "ready",
    "input_signature": [{"name": "x", "dtype": "float32", "shape": [None, 2]}],
    "placements": [],
}


def error(status: int, headers: dict | None = None) -> httpx.Response:
    body = {"error": {"code": f"http_{status}", "message": "try later", "field": None}}
    return httpx.Response(status, content=json.dumps(body).encode(), headers=headers)


class Script:
    """A mock transport handler that returns, raises or calls queued items in order."""

    def __init__(self, *responses):
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        item = self.responses.pop(0)
        if isinstance(item, Exception):
            raise item
        if callable(item):
            return item(request)
        return item


def client_for(handler, delays: list[float], **options) -> gr.GridNetwork:
    return gr.GridNetwork(
        URL,
        token=TOKEN,
        transport=httpx.MockTransport(handler),
        sleep=delays.append,
        **options,
    )


def infer_ok(request: httpx.Request) -> httpx.Response:
    inputs = safetensors.numpy.load(request.read())
    body = safetensors.numpy.save({"output": inputs["x"] * 2})
    return httpx.Response(200, content=body)


def test_retry_after_seconds_honoured():
    script = Script(
        error(429, {"Retry-After": "7"}),
        error(503, {"Retry-After": "2"}),
        httpx.Response(200, json={"tags": ["mri"]}),
    )
    delays = []
    with client_for(script, delays) as gateway:
        tags = gateway.available_tags()

    assert tags == ["mri"]
    assert delays == [7.0, 2.0]
    assert len(script.requests) == 3


def test_backoff_without_retry_after():
    script = Script(
        error(503), error(503), error(429), httpx.Response(200, json={"tags": []})
    )
    delays = []
    with client_for(script, delays) as gateway:
        gateway.available_tags()

    assert delays == [0.5, 1.0, 2.0]


def test_retry_after_http_date():
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    script = Script(
        error(429, {"Retry-After": when}), httpx.Response(200, json={"tags": []})
    )
    delays = []
    with client_for(script, delays) as gateway:
        gateway.available_tags()

    assert len(delays) == 1
    assert 27.0 <= delays[0] <= 30.0


def test_retries_exhausted_raises():
    script = Script(*[error(503, {"Retry-After": "1"}) for _ in range(4)])
    delays = []
    with client_for(script, delays, retries=3) as gateway:
        with pytest.raises(gr.Unavailable):
            gateway.available_tags()

    assert delays == [1.0, 1.0, 1.0]
    assert len(script.requests) == 4


def test_long_retry_after_not_waited():
    script = Script(error(429, {"Retry-After": "3600"}))
    delays = []
    with client_for(script, delays) as gateway:
        with pytest.raises(gr.RateLimited):
            gateway.available_tags()

    assert delays == []
    assert len(script.requests) == 1


def test_connection_error_retried_for_get():
    script = Script(
        httpx.ConnectError("refused"),
        httpx.ReadError("reset"),
        httpx.Response(200, json={"tags": ["a"]}),
    )
    delays = []
    with client_for(script, delays) as gateway:
        tags = gateway.available_tags()

    assert tags == ["a"]
    assert delays == [0.5, 1.0]


def test_infer_not_retried_on_400():
    script = Script(error(400), infer_ok)
    delays = []
    with client_for(script, delays) as gateway:
        gateway._signatures._names["m1"] = ["x"]
        with pytest.raises(gr.InvalidInput):
            gateway.run_remote_inference("m1", np.ones((2, 2), np.float32))

    assert delays == []
    assert len(script.requests) == 1


@pytest.mark.parametrize("status", [401, 403, 404, 409, 413, 415, 422])
def test_infer_not_retried_on_4xx(status):
    script = Script(error(status))
    delays = []
    with client_for(script, delays) as gateway:
        gateway._signatures._names["m1"] = ["x"]
        with pytest.raises(gr.GridError) as caught:
            gateway.run_remote_inference("m1", np.ones((2, 2), np.float32))

    assert caught.value.status == status
    assert delays == []
    assert len(script.requests) == 1


def test_infer_retried_on_429():
    script = Script(error(429, {"Retry-After": "3"}), infer_ok)
    delays = []
    with client_for(script, delays) as gateway:
        gateway._signatures._names["m1"] = ["x"]
        result = gateway.run_remote_inference("m1", np.ones((2, 2), np.float32))

    assert delays == [3.0]
    assert result.tolist() == [[2.0, 2.0], [2.0, 2.0]]
    bodies = [safetensors.numpy.load(r.read())["x"].tolist() for r in script.requests]
    assert bodies[0] == bodies[1]


@pytest.mark.parametrize(
    "failure", [httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("closed")]
)
def test_infer_retried_after_sent(failure):
    # The request may have reached the gateway, so only its Idempotency-Key
    # makes the retry safe: the retry must carry the same key.
    script = Script(failure, infer_ok)
    delays = []
    with client_for(script, delays) as gateway:
        gateway._signatures._names["m1"] = ["x"]
        result = gateway.run_remote_inference("m1", np.ones((2, 2), np.float32))

    keys = [r.headers.get("Idempotency-Key") for r in script.requests]
    assert result.tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert delays == [0.5]
    assert len(keys) == 2
    assert keys[0] is not None
    assert keys[1] == keys[0]


def test_infer_gives_up_after_retries():
    script = Script(*[httpx.ReadTimeout("slow") for _ in range(2)])
    delays = []
    with client_for(script, delays, retries=1) as gateway:
        gateway._signatures._names["m1"] = ["x"]
        with pytest.raises(gr.GridConnectionError) as caught:
            gateway.run_remote_inference("m1", np.ones((2, 2), np.float32))

    assert caught.value.code == "timeout"
    assert delays == [0.5]
    assert len(script.requests) == 2


def test_infer_retried_after_connect_error():
    script = Script(httpx.ConnectError("refused"), infer_ok)
    delays = []
    with client_for(script, delays) as gateway:
        gateway._signatures._names["m1"] = ["x"]
        result = gateway.run_remote_inference("m1", np.ones((1, 2), np.float32))

    assert delays == [0.5]
    assert result.tolist() == [[2.0, 2.0]]


def test_zero_retries_sends_once():
    script = Script(error(503))
    delays = []
    with client_for(script, delays, retries=0) as gateway:
        with pytest.raises(gr.Unavailable):
            gateway.available_tags()

    assert delays == []
    assert len(script.requests) == 1


def test_retry_resends_auth_header():
    script = Script(error(503), httpx.Response(200, json=MODEL))
    delays = []
    with client_for(script, delays) as gateway:
        gateway.get_model("m1")

    headers = [r.headers.get("Authorization") for r in script.requests]
    assert headers == [f"Bearer {TOKEN}", f"Bearer {TOKEN}"]


def test_retry_logged_without_token(caplog):
    script = Script(error(503, {"Retry-After": "1"}), httpx.Response(200, json=MODEL))
    delays = []
    with caplog.at_level("WARNING", logger="gridclient"):
        with client_for(script, delays) as gateway:
            gateway.get_model("m1")

    retries = [r.getMessage() for r in caplog.records if "Retrying" in r.getMessage()]
    assert retries == [
        "Retrying GET /api/models/m1/ in 1.0s after HTTP 503 http_503 (retry 1 of 3)"
    ]
    assert all(TOKEN not in r.getMessage() for r in caplog.records)
