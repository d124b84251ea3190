"""Datasets on the node: manifests, header scans, rescans and data-local jobs."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections import Counter
from pathlib import Path

import pytest
import safetensors.torch
import torch

from nodeagent.dataset_jobs import run_over_dataset
from nodeagent.datasets import (
    DatasetCatalog,
    ManifestError,
    load_manifest,
    scan_datasets,
)
from nodeagent.models import LoadedModel
from nodeagent.runner import InferenceError
from nodeagent.testing import FakeGateway, mlp, running
from tests.test_nodeagent_agent import make_agent, place


def write_dataset(directory: Path, stem: str, tensors: dict[str, torch.Tensor] | None = None, **manifest) -> Path:
    """Write ``<stem>.safetensors`` and a manifest; ``manifest`` overrides its fields."""
    directory.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = {"input": torch.rand(10, 8), "labels": torch.arange(10) % 3}
    safetensors.torch.save_file(tensors, directory / f"{stem}.safetensors")
    fields = {"name": stem, "tags": ["Digits", "test"], "description": "ten rows", "label_tensor": "labels"}
    fields.update(manifest)
    path = directory / f"{stem}.json"
    path.write_text(json.dumps(fields))
    return path


def loaded_mlp() -> LoadedModel:
    module, archive = mlp()
    return LoadedModel(sha256="0" * 64, size=len(archive), input_names=("input",), module=module)


# Manifests.


def test_manifest_valid(tmp_path):
    dataset = load_manifest(write_dataset(tmp_path, "shard-1"))
    assert dataset.name == "shard-1"
    assert dataset.tags == ("digits", "test")
    assert dataset.rows == 10
    assert dataset.label_tensor == "labels"
    assert dataset.tensors["input"].shape == (10, 8)
    assert dataset.allow_raw_outputs is False


def test_report_has_no_rows(tmp_path):
    dataset = load_manifest(write_dataset(tmp_path, "shard-1"))
    report = dataset.report()
    assert report["tensors"] == {"input": {"dtype": "float32", "shape": [10, 8]}, "labels": {"dtype": "int64", "shape": [10]}}
    assert set(report) == {"name", "tags", "description", "tensors", "rows", "label_tensor"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "other"}, "\"name\" must be 'shard-1'"),
        ({"name": "../../etc/passwd"}, "\"name\" must be 'shard-1'"),
        ({"tags": []}, '"tags" must be a non-empty list'),
        ({"tags": ["has space"]}, "tag 'has space' is invalid"),
        ({"tags": "digits"}, '"tags" must be a non-empty list'),
        ({"description": 5}, "'description' must be str"),
        ({"label_tensor": "missing"}, "\"label_tensor\" 'missing' is not a tensor of the dataset"),
        ({"label_tensor": "input"}, "label tensor 'input' must hold one integer class per row"),
        ({"allow_raw_outputs": "yes"}, "'allow_raw_outputs' must be bool"),
    ],
)
def test_manifest_invalid_fields(tmp_path, fields, message):
    path = write_dataset(tmp_path, "shard-1", **fields)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert message in str(caught.value)


def test_manifest_not_json(tmp_path):
    path = write_dataset(tmp_path, "shard-1")
    path.write_text("{not json")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert "is not valid JSON" in str(caught.value)


def test_manifest_missing_data_file(tmp_path):
    path = write_dataset(tmp_path, "shard-1")
    (tmp_path / "shard-1.safetensors").unlink()
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert "data file" in str(caught.value)
    assert "is missing" in str(caught.value)


def test_manifest_unsafe_file_name(tmp_path):
    path = tmp_path / ".hidden.json"
    path.write_text(json.dumps({"name": ".hidden", "tags": ["x"]}))
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert "dataset file names must be" in str(caught.value)


def test_manifest_rows_must_agree(tmp_path):
    path = write_dataset(tmp_path, "shard-1", {"input": torch.rand(10, 8), "labels": torch.arange(9)})
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert "different row counts" in str(caught.value)


def test_manifest_truncated_data_file(tmp_path):
    path = write_dataset(tmp_path, "shard-1")
    data = tmp_path / "shard-1.safetensors"
    data.write_bytes(data.read_bytes()[:-4])
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert "byte range does not match" in str(caught.value)


def test_scan_reads_header_only(tmp_path):
    """A sparse 1 GiB file scans at once: only its header is read."""
    header = json.dumps({"input": {"dtype": "F32", "shape": [2**28, 1], "data_offsets": [0, 2**30]}}).encode()
    data = tmp_path / "huge.safetensors"
    with data.open("wb") as file:
        file.write(struct.pack("<Q", len(header)) + header)
        file.truncate(8 + len(header) + 2**30)
    (tmp_path / "huge.json").write_text(json.dumps({"name": "huge", "tags": ["big"]}))
    dataset = load_manifest(tmp_path / "huge.json")
    assert dataset.rows == 2**28


def test_scan_skips_invalid_and_logs(tmp_path, caplog):
    write_dataset(tmp_path, "good")
    write_dataset(tmp_path, "bad", tags=[])
    safetensors.torch.save_file({"x": torch.zeros(2)}, tmp_path / "orphan.safetensors")
    with caplog.at_level(logging.WARNING, logger="nodeagent.datasets"):
        found = scan_datasets(tmp_path)
    assert sorted(found) == ["good"]
    assert "skipping dataset bad" in caplog.text
    assert "orphan.safetensors: it has no manifest" in caplog.text


def test_scan_missing_directory(tmp_path):
    assert scan_datasets(tmp_path / "absent") == {}


async def test_catalog_reports_changes(tmp_path):
    catalog = DatasetCatalog(tmp_path)
    first = await catalog.refresh()
    write_dataset(tmp_path / "datasets", "shard-1")
    second = await catalog.refresh()
    third = await catalog.refresh()
    assert first is False
    assert second is True
    assert third is False
    assert [entry["name"] for entry in catalog.reports()] == ["shard-1"]


async def test_catalog_watch_rescans_on_request(tmp_path):
    catalog = DatasetCatalog(tmp_path)
    changes: list[list[str]] = []

    async def on_change() -> None:
        changes.append([entry["name"] for entry in catalog.reports()])

    watcher = asyncio.create_task(catalog.watch(0, on_change))
    try:
        write_dataset(tmp_path / "datasets", "shard-1")
        catalog.request_rescan()
        for _ in range(100):
            if changes:
                break
            await asyncio.sleep(0.02)
    finally:
        watcher.cancel()
    assert changes == [["shard-1"]]


# Running a model over a dataset.


def test_predictions_match_local_model(tmp_path):
    rows = torch.rand(10, 8)
    dataset = load_manifest(write_dataset(tmp_path, "shard-1", {"input": rows, "labels": torch.arange(10) % 3}))
    model = loaded_mlp()
    # 96 bytes per chunk is three rows of 8 float32 values, so the run takes four chunks.
    body = run_over_dataset(model, dataset, aggregate=False, outputs="argmax", deadline=None, chunk_bytes=96)
    predictions = safetensors.torch.load(body)["predictions"]
    with torch.inference_mode():
        expected = model.module(rows).argmax(dim=1)
    assert predictions.dtype == torch.int64
    assert predictions.tolist() == expected.tolist()


def test_summary_counts_and_accuracy(tmp_path):
    torch.manual_seed(5)
    rows = torch.randn(10, 8) * 4
    model = loaded_mlp()
    with torch.inference_mode():
        expected = model.module(rows).argmax(dim=1)
    labels = expected.clone()
    labels[:3] = (labels[:3] + 1) % 3
    dataset = load_manifest(write_dataset(tmp_path, "shard-1", {"input": rows, "labels": labels}))
    summary = run_over_dataset(model, dataset, aggregate=True, outputs="argmax", deadline=None, chunk_bytes=96)
    counts = Counter(str(label) for label in expected.tolist())
    assert summary["rows"] == 10
    assert len(counts) > 1
    assert summary["class_counts"] == dict(counts)
    assert summary["correct"] == 7
    assert summary["accuracy"] == pytest.approx(0.7)
    assert summary["label_tensor"] == "labels"


def test_summary_without_labels(tmp_path):
    dataset = load_manifest(write_dataset(tmp_path, "shard-1", {"input": torch.rand(4, 8)}, label_tensor=None))
    summary = run_over_dataset(loaded_mlp(), dataset, aggregate=True, outputs="argmax", deadline=None)
    assert sum(summary["class_counts"].values()) == 4
    assert "accuracy" not in summary


def test_raw_outputs_match_local_model(tmp_path):
    rows = torch.rand(10, 8)
    dataset = load_manifest(write_dataset(tmp_path, "shard-1", {"input": rows, "labels": torch.arange(10) % 3}))
    model = loaded_mlp()
    body = run_over_dataset(model, dataset, aggregate=False, outputs="raw", deadline=None, chunk_bytes=96)
    with torch.inference_mode():
        expected = model.module(rows)
    assert torch.allclose(safetensors.torch.load(body)["output"], expected, atol=1e-6)


def test_input_mismatch_is_model_error(tmp_path):
    tensors = {"a": torch.rand(3, 8), "b": torch.rand(3, 8)}
    dataset = load_manifest(write_dataset(tmp_path, "shard-1", tensors, label_tensor=None))
    with pytest.raises(InferenceError) as caught:
        run_over_dataset(loaded_mlp(), dataset, aggregate=False, outputs="argmax", deadline=None)
    assert caught.value.kind == "model"
    assert "the model takes inputs input but the dataset has tensors a, b" in str(caught.value)


def test_past_deadline_is_node_error(tmp_path):
    dataset = load_manifest(write_dataset(tmp_path, "shard-1"))
    with pytest.raises(InferenceError) as caught:
        run_over_dataset(loaded_mlp(), dataset, aggregate=True, outputs="argmax", deadline=0.0)
    assert caught.value.kind == "node"
    assert "timed out after 0 of 10 rows" in str(caught.value)


# The agent over a real websocket.


async def test_agent_reports_and_runs_datasets(tmp_path):
    write_dataset(tmp_path / "datasets", "shard-1")
    _, archive = mlp()
    async with FakeGateway() as gateway, running(make_agent(gateway, tmp_path)) as agent_task:
        session = await gateway.next_session()
        ready = await place(session, archive)
        await session.send_json(
            {"type": "infer.dataset", "job_id": "job-1", "attempt": 1, "sha256": ready["sha256"], "dataset": "shard-1", "aggregate": True, "timeout": 10}
        )
        summary = await session.receive()
        await session.send_json(
            {"type": "infer.dataset", "job_id": "job-2", "attempt": 1, "sha256": ready["sha256"], "dataset": "shard-1", "outputs": "raw", "timeout": 10}
        )
        refused = await session.receive()
        await session.send_json(
            {"type": "infer.dataset", "job_id": "job-3", "attempt": 1, "sha256": ready["sha256"], "dataset": "absent", "timeout": 10}
        )
        missing = await session.receive()
        assert not agent_task.done()

    assert [entry["name"] for entry in session.hello["datasets"]] == ["shard-1"]
    assert summary["type"] == "infer.summary"
    assert summary["job_id"] == "job-1"
    assert summary["summary"]["rows"] == 10
    assert refused["type"] == "infer.error"
    assert refused["kind"] == "model"
    assert "does not allow raw outputs" in refused["error"]
    assert missing["kind"] == "node"
    assert "dataset 'absent' is not on this node" in missing["error"]


async def test_agent_sends_datasets_on_rescan(tmp_path):
    async with FakeGateway() as gateway:
        agent = make_agent(gateway, tmp_path)
        async with running(agent):
            session = await gateway.next_session()
            write_dataset(tmp_path / "datasets", "shard-2")
            agent.datasets.request_rescan()
            message = await session.receive()
    assert session.hello["datasets"] == []
    assert message["type"] == "datasets"
    assert [entry["name"] for entry in message["datasets"]] == ["shard-2"]
