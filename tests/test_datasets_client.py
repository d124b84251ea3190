"""The client's data-local calls against a mock gateway: what is sent, what comes back."""

import json

import httpx
import numpy as np
import pytest
import safetensors.numpy

import gridclient as gr

URL = "http://gateway.test"
RESULT = {"name": "scans-1", "node": 7, "node_name": "node-g", "node_status": "online", "tags": ["mri"], "rows": 3}


class FakeGateway:
    """Returns predictions, a summary or raw outputs for infer-dataset, as the request asks."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.params: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/models/m1/infer-dataset/"
        body = json.loads(request.read())
        self.bodies.append(body)
        self.params.append(dict(request.url.params))
        headers = {"X-Grid-Job-Id": "job-1", "X-Grid-Node": "node-g"}
        if body["outputs"] == "raw":
            content = safetensors.numpy.save({"output": np.ones((3, 2), np.float32)})
            return httpx.Response(200, content=content, headers=headers)
        if body["aggregate"]:
            return httpx.Response(200, json={"summary": {"rows": 3, "class_counts": {"1": 3}}}, headers=headers)
        return httpx.Response(200, json={"predictions": [1, 0, 1]}, headers=headers)


def client_for(gateway) -> gr.GridNetwork:
    return gr.GridNetwork(URL, token="t", transport=httpx.MockTransport(gateway))


def test_search_result_runs_on_its_node():
    gateway = FakeGateway()
    with client_for(gateway) as client:
        predictions, info = client.run_remote_inference_with_info("m1", dataset=RESULT, timeout=12)
    assert gateway.bodies == [{"node": 7, "dataset": "scans-1", "aggregate": False, "outputs": "argmax"}]
    assert gateway.params == [{"timeout": "12"}]
    assert predictions.dtype == np.int64
    assert predictions.tolist() == [1, 0, 1]
    assert info.node == "node-g"
    assert info.job_id == "job-1"


def test_dataset_ref_aggregate():
    gateway = FakeGateway()
    with client_for(gateway) as client:
        summary = client.run_remote_inference("m1", dataset=gr.DatasetRef(name="scans-1", node=7), aggregate=True)
    assert gateway.bodies[0]["aggregate"] is True
    assert summary == {"rows": 3, "class_counts": {"1": 3}}


def test_raw_outputs_decoded():
    with client_for(FakeGateway()) as client:
        outputs = client.run_remote_inference("m1", dataset=RESULT, raw_outputs=True)
    assert outputs.shape == (3, 2)


async def test_async_client_runs_on_node():
    gateway = FakeGateway()
    async with gr.AsyncGridNetwork(URL, token="t", transport=httpx.MockTransport(gateway)) as client:
        predictions = await client.run_remote_inference("m1", dataset=RESULT)
    assert predictions.tolist() == [1, 0, 1]


def test_ref_from_search_result():
    ref = gr.DatasetRef.from_value(RESULT)
    assert ref.name == "scans-1"
    assert ref.node == 7
    assert ref.tags == ("mri",)


def test_tensor_dict_is_not_a_ref():
    assert gr.DatasetRef.from_value({"name": np.zeros(2), "node": np.zeros(2)}) is None
    assert gr.DatasetRef.from_value({"name": "x", "node": True}) is None


@pytest.mark.parametrize(
    ("dataset", "options", "message"),
    [
        (np.zeros((2, 2), np.float32), {"aggregate": True}, "apply only to a dataset held on a node"),
        (RESULT, {"aggregate": True, "raw_outputs": True}, "not both"),
        (RESULT, {"wait": False}, "only with wait=True"),
    ],
)
def test_bad_options_raise(dataset, options, message):
    with client_for(FakeGateway()) as client:
        with pytest.raises(ValueError) as caught:
            client.run_remote_inference("m1", dataset=dataset, **options)
    assert message in str(caught.value)
