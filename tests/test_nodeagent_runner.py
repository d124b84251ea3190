"""Inference on loaded programs and the model store, without a gateway."""

from __future__ import annotations

import asyncio
import time

import pytest
import safetensors.torch
import torch

from nodeagent.models import LoadedModel, ModelError, ModelStore
from nodeagent.runner import (
    InferenceError,
    Runner,
    decode_inputs,
    encode_outputs,
    run_inference,
)
from nodeagent.testing import TwoInputs, mlp, sha256_of

SHA256 = "ab" * 32


def two_input_model() -> LoadedModel:
    return LoadedModel(
        sha256=SHA256, size=0, input_names=("a", "b"), module=TwoInputs()
    )


def test_inputs_in_program_order():
    a, b = torch.ones(2, 4), torch.zeros(2, 2)
    body = safetensors.torch.save({"b": b, "a": a})

    inputs = decode_inputs(two_input_model(), body)

    assert torch.equal(inputs[0], a)
    assert torch.equal(inputs[1], b)


def test_missing_input_kind_model():
    body = safetensors.torch.save({"a": torch.ones(2, 4)})

    with pytest.raises(InferenceError) as caught:
        decode_inputs(two_input_model(), body)

    assert caught.value.kind == "model"
    assert str(caught.value) == "missing input 'b': the program takes a, b"


def test_unexpected_input_kind_model():
    body = safetensors.torch.save(
        {"a": torch.ones(2, 4), "b": torch.ones(2, 2), "c": torch.ones(1)}
    )

    with pytest.raises(InferenceError) as caught:
        decode_inputs(two_input_model(), body)

    assert caught.value.kind == "model"
    assert str(caught.value) == "unexpected input 'c': the program takes a, b"


def test_shared_outputs_saved():
    tensor = torch.arange(6.0)

    outputs = safetensors.torch.load(encode_outputs((tensor, tensor)))

    assert torch.equal(outputs["output_0"], tensor)
    assert torch.equal(outputs["output_1"], tensor)


def test_transposed_output_saved():
    tensor = torch.arange(6.0).reshape(2, 3).t()

    outputs = safetensors.torch.load(encode_outputs(tensor))

    assert torch.equal(outputs["output"], tensor)


def test_dict_output_kind_model():
    with pytest.raises(InferenceError) as caught:
        encode_outputs({"logits": torch.ones(1)})

    assert caught.value.kind == "model"
    assert "returned dict" in str(caught.value)


def test_expired_deadline_kind_node():
    body = safetensors.torch.save({"a": torch.ones(2, 4), "b": torch.ones(2, 2)})

    with pytest.raises(InferenceError) as caught:
        run_inference(two_input_model(), body, deadline=time.monotonic() - 1)

    assert caught.value.kind == "node"
    assert str(caught.value) == "the request timed out while queued on the node"


def test_result_values():
    model = two_input_model()
    a, b = torch.randn(3, 4), torch.randn(3, 2)

    result = run_inference(model, safetensors.torch.save({"a": a, "b": b}))

    outputs = safetensors.torch.load(result.body)
    assert torch.allclose(outputs["output_0"], a @ model.module.weight + b)
    assert torch.allclose(outputs["output_1"], a.sum(dim=1))
    assert result.elapsed_ms > 0


async def test_runner_runs_in_parallel():
    runner = Runner(concurrency=2, delay_ms=300)
    body = safetensors.torch.save({"a": torch.ones(1, 4), "b": torch.ones(1, 2)})
    model = two_input_model()
    started = time.monotonic()
    try:
        await asyncio.gather(
            runner.run(model, body, deadline=None),
            runner.run(model, body, deadline=None),
        )
    finally:
        runner.shutdown()

    # One at a time would take at least 600 ms.
    assert time.monotonic() - started < 0.55


def test_path_rejects_traversal(tmp_path):
    store = ModelStore(tmp_path, max_model_bytes=1 << 30)

    with pytest.raises(ValueError) as caught:
        store.path_for("../../etc/passwd")

    assert "expected 64 lowercase hex digits" in str(caught.value)


def test_path_rejects_uppercase(tmp_path):
    store = ModelStore(tmp_path, max_model_bytes=1 << 30)

    with pytest.raises(ValueError):
        store.part_path(SHA256.upper())


def test_scan_skips_misnamed_file(tmp_path):
    _, archive = mlp()
    store = ModelStore(tmp_path, max_model_bytes=1 << 30)
    store.prepare()
    misnamed = store.directory / "model.pt2"
    misnamed.write_bytes(archive)

    models = store.scan()

    assert models == []
    assert misnamed.exists()


def test_scan_deletes_unloadable_file(tmp_path):
    data = b"hashes to its name but is no archive"
    store = ModelStore(tmp_path, max_model_bytes=1 << 30)
    store.prepare()
    path = store.path_for(sha256_of(data))
    path.write_bytes(data)

    models = store.scan()

    assert models == []
    assert not path.exists()


def test_prepare_clears_incoming(tmp_path):
    store = ModelStore(tmp_path, max_model_bytes=1 << 30)
    store.incoming.mkdir(parents=True)
    leftover = store.incoming / f"{SHA256}.part"
    leftover.write_bytes(b"half a model")

    store.prepare()

    assert not leftover.exists()


def test_unpacked_limit_enforced(tmp_path):
    _, archive = mlp()
    store = ModelStore(tmp_path, max_model_bytes=1000)
    store.prepare()
    part = store.part_path(sha256_of(archive))
    part.write_bytes(archive)

    with pytest.raises(ModelError) as caught:
        store.install(sha256_of(archive), part)

    assert "over the limit of 1000" in str(caught.value)
    assert not part.exists()
    assert not store.path_for(sha256_of(archive)).exists()


def test_install_loads_program(tmp_path):
    module, archive = mlp()
    store = ModelStore(tmp_path, max_model_bytes=1 << 30)
    store.prepare()
    sha256 = sha256_of(archive)
    part = store.part_path(sha256)
    part.write_bytes(archive)
    inputs = torch.randn(3, 8)

    model = store.install(sha256, part)

    assert model.input_names == ("input",)
    assert model.size == len(archive)
    assert store.path_for(sha256).read_bytes() == archive
    assert list(store.incoming.iterdir()) == []
    assert torch.allclose(model.module(inputs), module(inputs))
