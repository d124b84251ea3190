"""Client operations as effect generators, run by GridNetwork and AsyncGridNetwork.

See core.py for how the generators are driven.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx

from . import tensors
from .core import Core, Flow, Sleep, model_path, parse_json
from .exceptions import InvalidInput, NotFound, PlacementError, PlacementTimeout
from .info import InferenceInfo, JobInfo, ModelInfo, Placement
from .progress import ProgressStream, Reporter, format_size

logger = logging.getLogger(__name__)

# Seconds the client waits for an inference response beyond the timeout it
# sends to the gateway, so the gateway's own 504 arrives first.
RESPONSE_MARGIN = 10.0

# Placement polling interval in seconds: it starts at the first value and grows
# by the factor up to the last.
POLL_FIRST = 0.5
POLL_FACTOR = 1.5
POLL_MAX = 5.0

SAFETENSORS_TYPE = "application/vnd.safetensors"


def get_model(core: Core, model_id: str) -> Flow[ModelInfo]:
    data = yield from core.get_json(model_path(model_id))
    return ModelInfo.from_json(data)


def list_models(core: Core) -> Flow[list[ModelInfo]]:
    results = yield from core.list_results("/api/models/")
    return [ModelInfo.from_json(item) for item in results]


def list_nodes(core: Core) -> Flow[list[dict[str, Any]]]:
    return (yield from core.list_results("/api/nodes/"))


def delete_model(core: Core, model_id: str) -> Flow[None]:
    yield from core.request("DELETE", model_path(model_id), idempotent=True)
    logger.info("Deleted model %s", model_id)


def disconnect_nodes(core: Core) -> Flow[int]:
    # Disconnecting twice leaves the same state, so a retry after a lost
    # response is safe.
    response = yield from core.request(
        "POST", "/api/nodes/disconnect/", idempotent=True
    )
    count = int(parse_json(response)["disconnected"])
    logger.info("Disconnected %d nodes", count)
    return count


def search(
    core: Core, tags: tuple[str, ...], include_offline: bool
) -> Flow[list[dict[str, Any]]]:
    if not tags:
        raise ValueError("search needs at least one tag, for example search('mri')")
    for tag in tags:
        if not tag or "," in tag:
            raise ValueError(
                f"invalid tag {tag!r}: tags are non-empty and contain no comma"
            )
    params = {"tags": ",".join(tags)}
    if include_offline:
        params["include_offline"] = "true"
    return (yield from core.list_results("/api/search/", params))


def available_tags(core: Core) -> Flow[list[str]]:
    data = yield from core.get_json("/api/tags/")
    return list(data["tags"])


def search_model(core: Core, model_id: str) -> Flow[list[Placement]]:
    info = yield from get_model(core, model_id)
    return [placement for placement in info.placements if placement.status == "ready"]


def upload_model(
    core: Core,
    archive: bytes,
    signature: list[dict[str, Any]],
    *,
    model_id: str,
    allow_remote_inference: bool,
    allow_download: bool,
    replicas: int,
    reporter: Reporter,
) -> Flow[ModelInfo]:
    """Upload a .pt2 archive as multipart/form-data and return the created model."""
    fields = {
        "model_id": model_id,
        "allow_remote_inference": _form_bool(allow_remote_inference),
        "allow_download": _form_bool(allow_download),
        "replicas": str(replicas),
        "input_signature": json.dumps(signature),
    }
    files = {"file": (f"{model_id}.pt2", archive, "application/octet-stream")}
    # httpx encodes the multipart body once here, so retries resend the same
    # bytes and the progress bar gets the total size.
    encoded = httpx.Request("POST", core.url, data=fields, files=files)
    body = encoded.read()
    headers = {
        "Content-Type": encoded.headers["Content-Type"],
        "Content-Length": str(len(body)),
    }

    task = reporter.add_task(f"Uploading {model_id}", total=len(body))

    def on_progress(sent: int) -> None:
        reporter.update(task, completed=sent)

    logger.info(
        "Uploading model %s (%d bytes, %d replicas)", model_id, len(body), replicas
    )
    reporter.update(task, detail=format_size(len(body)))
    response = yield from core.request(
        "POST",
        "/api/models/",
        idempotent=False,
        stream=ProgressStream(body, on_progress),
        headers=headers,
    )
    reporter.update(task, completed=len(body))
    return ModelInfo.from_json(parse_json(response))


def serve(
    core: Core,
    cache: SignatureCache,
    archive: bytes,
    signature: list[dict[str, Any]],
    *,
    model_id: str,
    allow_remote_inference: bool,
    allow_download: bool,
    replicas: int,
    wait: bool,
    timeout: float,
    progress: bool,
) -> Flow[ModelInfo]:
    """Upload a model and, with ``wait``, poll until its placement settles."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    with Reporter(progress) as reporter:
        info = yield from upload_model(
            core,
            archive,
            signature,
            model_id=model_id,
            allow_remote_inference=allow_remote_inference,
            allow_download=allow_download,
            replicas=replicas,
            reporter=reporter,
        )
        cache.store(info)
        if not wait:
            return info
        return (
            yield from wait_for_placement(
                core, info, timeout=timeout, reporter=reporter
            )
        )


def _form_bool(value: bool) -> str:
    return "true" if value else "false"


def wait_for_placement(
    core: Core,
    info: ModelInfo,
    *,
    timeout: float,
    reporter: Reporter,
) -> Flow[ModelInfo]:
    """Poll a model until it is ready or degraded, and return its final info.

    Raises PlacementError when the placement failed and PlacementTimeout when
    the model is still placing after ``timeout`` seconds.
    """
    model_id = info.model_id
    deadline = core.clock() + timeout
    interval = POLL_FIRST
    task = reporter.add_task(f"Placing {model_id}", total=info.replicas)

    while True:
        reporter.update(
            task,
            completed=info.ready_replicas,
            detail=f"{info.ready_replicas}/{info.replicas} replicas ready",
        )
        if info.status == "ready":
            logger.info(
                "Model %s is ready on %d replicas", model_id, info.ready_replicas
            )
            return info
        if info.status == "degraded":
            logger.warning(
                "Model %s is degraded: %d of %d replicas ready. %s",
                model_id,
                info.ready_replicas,
                info.replicas,
                info.status_reason,
            )
            return info
        if info.status == "failed":
            raise _placement_failed(info)

        remaining = deadline - core.clock()
        if remaining <= 0:
            raise _placement_timed_out(info, timeout)
        yield Sleep(min(interval, remaining))
        interval = min(interval * POLL_FACTOR, POLL_MAX)
        info = yield from get_model(core, model_id)


def _describe(placement: Placement) -> str:
    text = f"{placement.node_name or '?'} (node {placement.node}) {placement.status}"
    if placement.error:
        text += f": {placement.error}"
    return text


def _placement_failed(info: ModelInfo) -> PlacementError:
    failed = [p for p in info.placements if p.status == "failed"]
    reason = info.status_reason or "no reason given"
    details = "; ".join(_describe(p) for p in failed) or "no failed placement listed"
    return PlacementError(
        f"placement of model {info.model_id!r} failed: {reason}. Nodes: {details}",
        model=info,
        placements=failed,
    )


def _placement_timed_out(info: ModelInfo, timeout: float) -> PlacementTimeout:
    pending = [p for p in info.placements if p.status not in ("ready", "failed")]
    if pending:
        details = "; ".join(_describe(p) for p in pending)
    else:
        details = "no node has accepted the model yet"
    return PlacementTimeout(
        f"model {info.model_id!r} is still {info.status} after {timeout:g}s with "
        f"{info.ready_replicas} of {info.replicas} replicas ready. Pending: {details}. "
        "The gateway keeps placing it: check again with get_model",
        model=info,
        placements=pending,
        code="placement_timeout",
    )


class SignatureCache:
    """Input names per model_id, fetched once per client."""

    def __init__(self) -> None:
        self._names: dict[str, list[str]] = {}

    def store(self, info: ModelInfo) -> None:
        if info.input_signature:
            self._names[info.model_id] = info.input_names

    def forget(self, model_id: str) -> None:
        self._names.pop(model_id, None)

    def input_names(self, core: Core, model_id: str) -> Flow[list[str]]:
        if model_id not in self._names:
            info = yield from get_model(core, model_id)
            if not info.input_signature:
                raise InvalidInput(
                    f"model {model_id!r} has no input signature, so the client "
                    "cannot name its inputs",
                    code="missing_signature",
                )
            self.store(info)
        return self._names[model_id]


def run_inference(
    core: Core,
    cache: SignatureCache,
    model_id: str,
    dataset: Any,
    *,
    timeout: float,
    batch_size: int | None,
    progress: bool | None,
) -> Flow[tuple[Any, InferenceInfo]]:
    """Send a dataset in chunks along dim 0 and return the joined outputs.

    Also returns the job id, node and attempts of every request.
    """
    names = yield from cache.input_names(core, model_id)
    arrays, as_torch = tensors.prepare_inputs(dataset, names)
    total = tensors.count_rows(arrays)
    chunk_rows = tensors.rows_per_chunk(arrays, batch_size)
    chunks = tensors.split_rows(arrays, chunk_rows)
    show = len(chunks) > 1 if progress is None else progress

    outputs = []
    jobs = []
    done = 0
    with Reporter(show) as reporter:
        task = reporter.add_task(f"Inference on {model_id}", total=total)
        for index, chunk in enumerate(chunks):
            try:
                result, job = yield from _infer_chunk(core, model_id, chunk, timeout)
            except (InvalidInput, NotFound):
                # The model may have been replaced with other inputs since the
                # signature was cached.
                cache.forget(model_id)
                raise
            if len(chunks) > 1:
                _check_output_rows(result, tensors.count_rows(chunk), index)
            outputs.append(result)
            jobs.append(job)
            done += tensors.count_rows(chunk)
            reporter.update(task, completed=done, detail=f"{done}/{total} rows")

    joined = tensors.to_result(tensors.concatenate(outputs), as_torch)
    return joined, InferenceInfo(jobs=tuple(jobs))


def _infer_chunk(
    core: Core, model_id: str, chunk: dict[str, Any], timeout: float
) -> Flow[tuple[dict[str, Any], JobInfo]]:
    response = yield from core.request(
        "POST",
        model_path(model_id, "infer/"),
        idempotent=False,
        params={"timeout": f"{timeout:g}"},
        content=tensors.encode(chunk),
        headers={"Content-Type": SAFETENSORS_TYPE},
        timeout=timeout + RESPONSE_MARGIN,
    )
    job = JobInfo(
        job_id=response.headers.get("X-Grid-Job-Id"),
        node=response.headers.get("X-Grid-Node"),
        attempts=_header_int(response.headers.get("X-Grid-Attempts"), default=1),
    )
    logger.debug(
        "Inference on model %s: job %s on node %s after %d attempts",
        model_id,
        job.job_id,
        job.node,
        job.attempts,
    )
    return tensors.decode(response.content), job


def _header_int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _check_output_rows(outputs: dict[str, Any], rows: int, index: int) -> None:
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise ValueError(
                f"output {name!r} of chunk {index} has shape {array.shape}, not "
                f"{rows} rows at dim 0, so chunk outputs cannot be joined; pass a "
                "batch_size that covers the whole dataset"
            )
