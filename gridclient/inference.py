"""Remote inference: a dataset split into chunks, sent in parallel, joined in order.

The functions are effect generators like those in operations.py; core.py
describes how the clients run them.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from . import tensors
from .core import Core, Flow, gather, model_path
from .exceptions import InvalidInput, NotFound
from .info import InferenceInfo, JobInfo
from .operations import SignatureCache
from .progress import Reporter

logger = logging.getLogger(__name__)

# Seconds the client waits for an inference response beyond the timeout it
# sends to the gateway, so the gateway's own 504 arrives first.
RESPONSE_MARGIN = 10.0

SAFETENSORS_TYPE = "application/vnd.safetensors"


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


def check_inference_options(*, verify: int, concurrency: int) -> None:
    if verify not in (1, 2):
        raise ValueError(
            f"verify must be 1 (one replica) or 2 (two replicas, outputs "
            f"compared), got {verify}"
        )
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")


def prepare_chunks(
    core: Core,
    cache: SignatureCache,
    model_id: str,
    dataset: Any,
    batch_size: int | None,
) -> Flow[tuple[list[dict[str, Any]], bool]]:
    """Split a dataset into per-request chunks of rows along dim 0.

    Returns the chunks, which are views of the prepared input arrays rather
    than copies, and whether the caller passed torch tensors.
    """
    names = yield from cache.input_names(core, model_id)
    arrays, as_torch = tensors.prepare_inputs(dataset, names)
    chunk_rows = tensors.rows_per_chunk(arrays, batch_size)
    return tensors.split_rows(arrays, chunk_rows), as_torch


def run_inference(
    core: Core,
    cache: SignatureCache,
    model_id: str,
    dataset: Any,
    *,
    timeout: float,
    batch_size: int | None,
    progress: bool | None,
    verify: int = 1,
    concurrency: int = 1,
) -> Flow[tuple[Any, InferenceInfo]]:
    """Send a dataset in chunks along dim 0 and return the joined outputs.

    Up to ``concurrency`` chunks are in flight at once, and each is encoded
    only when its request starts, so at most ``concurrency`` encoded chunks
    exist at a time. Also returns the job id, node, attempts and verifying
    nodes of every request.
    """
    check_inference_options(verify=verify, concurrency=concurrency)
    chunks, as_torch = yield from prepare_chunks(
        core, cache, model_id, dataset, batch_size
    )
    total = sum(tensors.count_rows(chunk) for chunk in chunks)
    show = len(chunks) > 1 if progress is None else progress
    several = len(chunks) > 1
    flows = [
        _infer_chunk(
            core,
            model_id,
            chunk,
            index,
            timeout=timeout,
            verify=verify,
            check_rows=several,
        )
        for index, chunk in enumerate(chunks)
    ]

    with Reporter(show) as reporter:
        task = reporter.add_task(f"Inference on {model_id}", total=total)
        done = 0

        def on_result(index: int, result: Any) -> None:
            nonlocal done
            done += tensors.count_rows(chunks[index])
            reporter.update(task, completed=done, detail=f"{done}/{total} rows")

        try:
            results = yield from gather(flows, concurrency, on_result)
        except (InvalidInput, NotFound):
            # The model may have been replaced with other inputs since the
            # signature was cached.
            cache.forget(model_id)
            raise

    outputs = [outputs for outputs, _ in results]
    jobs = tuple(job for _, job in results)
    joined = tensors.to_result(tensors.concatenate(outputs), as_torch)
    return joined, InferenceInfo(jobs=jobs)


def _infer_chunk(
    core: Core,
    model_id: str,
    chunk: dict[str, Any],
    index: int,
    *,
    timeout: float,
    verify: int,
    check_rows: bool,
) -> Flow[tuple[dict[str, Any], JobInfo]]:
    """Send one chunk to the infer endpoint and return its outputs and job.

    The chunk keeps one Idempotency-Key across the client's retries, so a
    retry after a request that reached the gateway gets that request's job and
    output back instead of running the chunk again. That makes every transport
    error safe to retry.
    """
    params = {"timeout": f"{timeout:g}"}
    if verify > 1:
        params["verify"] = str(verify)
    response = yield from core.request(
        "POST",
        model_path(model_id, "infer/"),
        idempotent=True,
        params=params,
        content=tensors.encode(chunk),
        headers={
            "Content-Type": SAFETENSORS_TYPE,
            "Idempotency-Key": new_idempotency_key(),
        },
        # With verify=2 the gateway runs the two replicas one after the other,
        # each with the full timeout.
        timeout=timeout * verify + RESPONSE_MARGIN,
    )
    verified_by = response.headers.get("X-Grid-Verified-By") or ""
    job = JobInfo(
        job_id=response.headers.get("X-Grid-Job-Id"),
        node=response.headers.get("X-Grid-Node"),
        attempts=_header_int(response.headers.get("X-Grid-Attempts"), default=1),
        verified_by=tuple(name for name in verified_by.split(",") if name),
    )
    logger.debug(
        "Inference on model %s chunk %d: job %s on node %s after %d attempts",
        model_id,
        index,
        job.job_id,
        job.node,
        job.attempts,
    )
    outputs = tensors.decode(response.content)
    if check_rows:
        check_output_rows(outputs, tensors.count_rows(chunk), index)
    return outputs, job


def _header_int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def check_output_rows(outputs: dict[str, Any], rows: int, index: int) -> None:
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise ValueError(
                f"output {name!r} of chunk {index} has shape {array.shape}, not "
                f"{rows} rows at dim 0, so chunk outputs cannot be joined; pass a "
                "batch_size that covers the whole dataset"
            )
