"""Data-local inference: a node runs the model over its own dataset.

The client names the dataset and its node (a search result); the rows never
leave the node, and only predictions or a summary come back. The function is
an effect generator like those in operations.py; core.py describes how the
clients run it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from . import tensors
from .core import Core, Flow, model_path, parse_json
from .info import DatasetRef, InferenceInfo, JobInfo

logger = logging.getLogger(__name__)

# Seconds the client waits beyond the timeout it sends, so the gateway's own
# 504 arrives first.
RESPONSE_MARGIN = 10.0


def check_options(dataset: Any, *, aggregate: bool, raw_outputs: bool) -> DatasetRef | None:
    """Return the DatasetRef that ``dataset`` names, or None for tensors.

    Raises ValueError for options that apply only to a dataset on a node.
    """
    ref = DatasetRef.from_value(dataset)
    if ref is None and (aggregate or raw_outputs):
        raise ValueError(
            "aggregate and raw_outputs apply only to a dataset held on a node: "
            "pass a search() result as dataset"
        )
    if aggregate and raw_outputs:
        raise ValueError("ask for either aggregate=True or raw_outputs=True, not both")
    return ref


def run_dataset_inference(
    core: Core,
    model_id: str,
    ref: DatasetRef,
    *,
    aggregate: bool,
    raw_outputs: bool,
    timeout: float,
) -> Flow[tuple[Any, InferenceInfo]]:
    """Run a model over a dataset on its node and return what the node sent back.

    Returns a dict summary with ``aggregate``, the raw outputs (as
    run_remote_inference returns them, numpy) with ``raw_outputs``, and else a
    numpy int64 array with the argmax class of each row.
    """
    body = {
        "node": ref.node,
        "dataset": ref.name,
        "aggregate": aggregate,
        "outputs": "raw" if raw_outputs else "argmax",
    }
    response = yield from core.request(
        "POST",
        model_path(model_id, "infer-dataset/"),
        idempotent=False,
        params={"timeout": f"{timeout:g}"},
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        timeout=timeout + RESPONSE_MARGIN,
    )
    job = JobInfo(
        job_id=response.headers.get("X-Grid-Job-Id"),
        node=response.headers.get("X-Grid-Node"),
        attempts=1,
    )
    logger.debug(
        "Model %s over dataset %s on node %s: job %s",
        model_id,
        ref.name,
        job.node,
        job.job_id,
    )
    if raw_outputs:
        result: Any = tensors.to_result(tensors.decode(response.content), as_torch=False)
    elif aggregate:
        result = parse_json(response)["summary"]
    else:
        result = np.asarray(parse_json(response)["predictions"], dtype=np.int64)
    return result, InferenceInfo(jobs=(job,))
