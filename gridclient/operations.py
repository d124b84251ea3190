"""Client operations as effect generators, run by GridNetwork and AsyncGridNetwork.

See core.py for how the generators are driven.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import httpx

from .core import Core, Flow, Sleep, model_path, parse_json
from .exceptions import GridError, InvalidInput, PlacementError, PlacementTimeout
from .info import ModelInfo, Placement
from .progress import ProgressStream, Reporter, format_size

logger = logging.getLogger(__name__)

# Placement polling interval in seconds: it starts at the first value and grows
# by the factor up to the last.
POLL_FIRST = 0.5
POLL_FACTOR = 1.5
POLL_MAX = 5.0


def get_model(core: Core, model_id: str) -> Flow[ModelInfo]:
    data = yield from core.get_json(model_path(model_id))
    return ModelInfo.from_json(data)


def list_models(core: Core, search: str | None = None) -> Flow[list[ModelInfo]]:
    params = {"search": search} if search else None
    results = yield from core.list_results("/api/models/", params)
    return [ModelInfo.from_json(item) for item in results]


def list_nodes(core: Core) -> Flow[list[dict[str, Any]]]:
    return (yield from core.list_results("/api/nodes/"))


def update_model(
    core: Core, model_id: str, changes: dict[str, bool]
) -> Flow[ModelInfo]:
    if not changes:
        raise ValueError(
            "update_model needs allow_remote_inference= or allow_download="
        )
    # Setting the same values twice leaves the same state, so a retry is safe.
    response = yield from core.request(
        "PATCH",
        model_path(model_id),
        idempotent=True,
        content=json.dumps(changes).encode(),
        headers={"Content-Type": "application/json"},
    )
    logger.info("Updated model %s: %s", model_id, changes)
    return ModelInfo.from_json(parse_json(response))


def download_model(core: Core, model_id: str, timeout: float) -> Flow[bytes]:
    """Fetch a model's .pt2 bytes and check them against the version's SHA-256."""
    response = yield from core.request(
        "GET", model_path(model_id, "download/"), idempotent=True, timeout=timeout
    )
    data = response.content
    expected = response.headers.get("X-Grid-Sha256", "")
    actual = hashlib.sha256(data).hexdigest()
    if expected and actual != expected:
        raise GridError(
            502,
            "download_corrupt",
            f"model {model_id!r} arrived with sha256 {actual}, expected {expected}; "
            "download it again",
        )
    logger.info("Downloaded model %s: %d bytes", model_id, len(data))
    return data


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


def available_tags(core: Core, include_offline: bool = False) -> Flow[list[str]]:
    params = {"include_offline": "true"} if include_offline else None
    data = yield from core.get_json("/api/tags/", params)
    return list(data["tags"])


def search_model(core: Core, model_id: str) -> Flow[list[Placement]]:
    """List the ready replicas of a model on online nodes."""
    results = yield from core.list_results(model_path(model_id, "nodes/"))
    return [Placement.from_json(item) for item in results]


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
