"""run_remote_inference: encoding, chunking along dim 0 and joining outputs."""

import json

import httpx
import numpy as np
import pytest
import safetensors.numpy
import torch

import gridclient as gr

URL = "http://gateway.test"


def signature(*inputs):
    return [{"name": name, "dtype": "float32", "shape": [None, 2]} for name in inputs]


class FakeGateway:
    """Serves one model whose output is computed from the request's inputs.

    ``compute`` maps the decoded inputs to the output tensors, so a chunk sent
    out of order or twice shows up in the joined result.
    """

    def __init__(self, inputs=("x",), compute=None):
        self.inputs = inputs
        self.compute = compute or (lambda arrays: {"output": arrays["x"] * 2})
        self.model_gets = 0
        self.bodies: list[dict[str, np.ndarray]] = []
        self.params: list[dict[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path == "/api/models/m1/":
            self.model_gets += 1
            model = {
                "model_id": "m1",
                "status": "ready",
                "input_signature": signature(*self.inputs),
            }
            return httpx.Response(200, json=model)
        if request.method == "POST" and request.url.path == "/api/models/m1/infer/":
            assert request.headers["Content-Type"] == "application/vnd.safetensors"
            arrays = safetensors.numpy.load(request.read())
            self.bodies.append(arrays)
            self.params.append(dict(request.url.params))
            body = safetensors.numpy.save(self.compute(arrays))
            headers = {
                "X-Grid-Job-Id": str(len(self.bodies)),
                "X-Grid-Node": "node-a",
                "X-Grid-Attempts": "1",
            }
            return httpx.Response(200, content=body, headers=headers)
        error = {"error": {"code": "not_found", "message": "no route", "field": None}}
        return httpx.Response(404, content=json.dumps(error).encode())


def client_for(handler) -> gr.GridNetwork:
    return gr.GridNetwork(
        URL, token="tok", transport=httpx.MockTransport(handler), sleep=lambda s: None
    )


def test_numpy_in_numpy_out():
    gateway = FakeGateway()
    data = np.arange(6, dtype=np.float32).reshape(3, 2)
    with client_for(gateway) as client:
        result = client.run_remote_inference("m1", data)

    assert isinstance(result, np.ndarray)
    assert result.tolist() == [[0, 2], [4, 6], [8, 10]]
    assert gateway.params == [{"timeout": "30"}]


def test_torch_in_torch_out():
    gateway = FakeGateway()
    data = torch.arange(4, dtype=torch.float32).reshape(2, 2)
    with client_for(gateway) as client:
        result = client.run_remote_inference(model_id="m1", dataset=data)

    assert isinstance(result, torch.Tensor)
    assert result.dtype == torch.float32
    assert result.tolist() == [[0, 2], [4, 6]]


def test_chunks_joined_in_order():
    gateway = FakeGateway()
    data = np.arange(20, dtype=np.float32).reshape(10, 2)
    with client_for(gateway) as client:
        result = client.run_remote_inference(
            "m1", data, batch_size=3, progress=False, concurrency=1
        )

    assert [len(body["x"]) for body in gateway.bodies] == [3, 3, 3, 1]
    assert gateway.bodies[1]["x"].tolist() == [[6, 7], [8, 9], [10, 11]]
    assert result.shape == (10, 2)
    assert np.array_equal(result, data * 2)


def test_default_chunks_about_8mb():
    gateway = FakeGateway()
    # 1024 float32 per row is 4 KiB, so 8 MiB fits 2048 rows.
    data = np.ones((5000, 1024), dtype=np.float32)
    data[:, 0] = np.arange(5000)
    with client_for(gateway) as client:
        result = client.run_remote_inference(
            "m1", data, progress=False, concurrency=1
        )

    assert [len(body["x"]) for body in gateway.bodies] == [2048, 2048, 904]
    assert result[:, 0].tolist() == (np.arange(5000) * 2).tolist()


def test_single_row_larger_than_chunk():
    gateway = FakeGateway()
    data = np.ones((2, 3 * 1024 * 1024), dtype=np.float32)
    with client_for(gateway) as client:
        result = client.run_remote_inference("m1", data, progress=False)

    assert [len(body["x"]) for body in gateway.bodies] == [1, 1]
    assert result.shape == (2, 3 * 1024 * 1024)


def test_dict_inputs_two_names():
    gateway = FakeGateway(
        inputs=("image", "mask"), compute=lambda a: {"output": a["image"] * a["mask"]}
    )
    image = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    with client_for(gateway) as client:
        result = client.run_remote_inference(
            "m1", {"mask": mask, "image": image}, batch_size=2, concurrency=1
        )

    assert set(gateway.bodies[0]) == {"image", "mask"}
    assert gateway.bodies[1]["mask"].tolist() == [[1.0, 1.0]]
    assert result.tolist() == [[1.0, 0.0], [0.0, 4.0], [5.0, 6.0]]


def test_several_outputs_return_dict():
    def compute(arrays):
        x = arrays["x"]
        return {"output_1": x.sum(axis=1), "output_0": x * 10}

    gateway = FakeGateway(compute=compute)
    data = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float32)
    with client_for(gateway) as client:
        result = client.run_remote_inference("m1", data, batch_size=2)

    assert list(result) == ["output_0", "output_1"]
    assert result["output_0"].tolist() == [[10, 20], [30, 40], [50, 60]]
    assert result["output_1"].tolist() == [3, 7, 11]


def test_signature_fetched_once():
    gateway = FakeGateway()
    data = np.ones((2, 2), dtype=np.float32)
    with client_for(gateway) as client:
        client.run_remote_inference("m1", data)
        client.run_remote_inference("m1", data)

    assert gateway.model_gets == 1
    assert len(gateway.bodies) == 2


def test_signature_refetched_after_invalid_input():
    gateway = FakeGateway()
    calls = []

    def handler(request):
        calls.append(request.method)
        if request.method == "POST" and len(calls) == 2:
            error = {
                "error": {"code": "invalid", "message": "missing input y", "field": "y"}
            }
            return httpx.Response(400, json=error)
        return gateway(request)

    data = np.ones((2, 2), dtype=np.float32)
    with client_for(handler) as client:
        with pytest.raises(gr.InvalidInput):
            client.run_remote_inference("m1", data)
        client.run_remote_inference("m1", data)

    assert gateway.model_gets == 2


def test_timeout_sent_as_query():
    gateway = FakeGateway()
    with client_for(gateway) as client:
        client.run_remote_inference("m1", np.ones((1, 2), np.float32), timeout=2.5)

    assert gateway.params == [{"timeout": "2.5"}]


def test_wrong_dict_keys_raise():
    gateway = FakeGateway(inputs=("image", "mask"))
    with client_for(gateway) as client:
        with pytest.raises(ValueError) as caught:
            client.run_remote_inference(
                "m1", {"image": np.ones((1, 2)), "other": np.ones((1, 2))}
            )

    assert "missing ['mask']" in str(caught.value)
    assert "unknown ['other']" in str(caught.value)
    assert gateway.bodies == []


def test_single_tensor_for_two_inputs_raises():
    gateway = FakeGateway(inputs=("image", "mask"))
    with client_for(gateway) as client:
        with pytest.raises(ValueError, match="takes 2 inputs"):
            client.run_remote_inference("m1", np.ones((1, 2)))


def test_mismatched_rows_raise():
    gateway = FakeGateway(inputs=("image", "mask"))
    with client_for(gateway) as client:
        with pytest.raises(ValueError, match="same size at dim 0"):
            client.run_remote_inference(
                "m1", {"image": np.ones((2, 2)), "mask": np.ones((3, 2))}
            )


def test_empty_dataset_raises():
    gateway = FakeGateway()
    with client_for(gateway) as client:
        with pytest.raises(ValueError, match="no rows"):
            client.run_remote_inference("m1", np.ones((0, 2), np.float32))

    assert gateway.bodies == []


def test_bad_batch_size_raises():
    gateway = FakeGateway()
    with client_for(gateway) as client:
        with pytest.raises(ValueError, match="batch_size must be at least 1"):
            client.run_remote_inference("m1", np.ones((2, 2), np.float32), batch_size=0)


def test_unbatched_output_cannot_join():
    gateway = FakeGateway(compute=lambda a: {"output": a["x"].sum(keepdims=True)})
    with client_for(gateway) as client:
        with pytest.raises(ValueError, match="cannot be joined"):
            client.run_remote_inference("m1", np.ones((4, 2), np.float32), batch_size=2)


def test_bfloat16_input_raises():
    gateway = FakeGateway()
    with client_for(gateway) as client:
        with pytest.raises(TypeError, match=r"convert it with \.float\(\)"):
            client.run_remote_inference("m1", torch.ones((2, 2), dtype=torch.bfloat16))


def test_result_is_writable():
    gateway = FakeGateway()
    with client_for(gateway) as client:
        result = client.run_remote_inference("m1", np.ones((2, 2), np.float32))

    result[0, 0] = 5.0
    assert result[0, 0] == 5.0


def test_with_info_reports_jobs():
    gateway = FakeGateway()
    data = np.ones((5, 2), dtype=np.float32)
    with client_for(gateway) as client:
        result, info = client.run_remote_inference_with_info(
            "m1", data, batch_size=2, concurrency=1
        )

    assert result.shape == (5, 2)
    assert [job.job_id for job in info.jobs] == ["1", "2", "3"]
    assert info.node == "node-a"
    assert info.job_id == "3"
    assert info.attempts == 1


def test_with_info_missing_headers():
    def handler(request):
        if request.method == "GET":
            return FakeGateway()(request)
        arrays = safetensors.numpy.load(request.read())
        return httpx.Response(
            200, content=safetensors.numpy.save({"output": arrays["x"]})
        )

    with client_for(handler) as client:
        _, info = client.run_remote_inference_with_info(
            "m1", np.ones((1, 2), np.float32)
        )

    assert info.node is None
    assert info.job_id is None
    assert info.attempts == 1
