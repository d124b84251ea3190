"""Stream a model's bytes from one of its replicas through the gateway.

The gateway has no copy, so it asks a node holding a ready replica to upload
the file into the staging folder (apps.inference.services.relay) and streams
the file to the client while it is still being written. The staged copy is
deleted afterwards unless a placement needs it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse

from apps.accounts.permissions import READ, authenticate_bearer
from apps.inference.models import Model
from apps.inference.services import dispatch, placement, relay
from gridsite.errors import ApiError, method_not_allowed

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
# Seconds without a new byte after which a stalled relay is abandoned.
STALL_SECONDS = 30.0


def _authorize(request: HttpRequest, model_id: str) -> Model:
    authenticate_bearer(request, READ)
    model = Model.objects.filter(model_id=model_id).first()
    if model is None:
        raise ApiError(404, "not_found", f"model {model_id!r} not found; GET /api/models/ lists the served models")
    if not model.allow_download:
        raise ApiError(403, "forbidden", f"model {model_id!r} does not allow downloads; its owner serves it with allow_download=False")
    return model


def _start_relay(model: Model) -> None:
    placement.add_staging_reader(model.sha256)
    if placement.staging_path(model.sha256).exists():
        return
    source = dispatch.choose_node(model.pk)
    if source is None:
        raise ApiError(503, "no_replica", f"no online node holds a ready replica of model {model.model_id!r} to download from", headers={"Retry-After": "5"})
    if not relay.request_relay(model.sha256, source):
        raise ApiError(503, "no_replica", f"node {source} did not take the upload request; try again", headers={"Retry-After": "2"})


async def download(request: HttpRequest, model_id: str) -> HttpResponse:
    if request.method != "GET":
        return method_not_allowed(request, "GET").response()
    try:
        model = await database_sync_to_async(_authorize)(request, model_id)
    except ApiError as exc:
        return exc.response()
    try:
        await database_sync_to_async(_start_relay)(model)
    except ApiError as exc:
        await database_sync_to_async(placement.remove_staging_reader)(model.sha256)
        return exc.response()
    response = StreamingHttpResponse(_stream(model), content_type="application/octet-stream")
    response["Content-Length"] = str(model.size)
    response["Content-Disposition"] = f'attachment; filename="{model.model_id}.pt2"'
    response["X-Grid-Sha256"] = model.sha256
    return response


async def _open_when_present(staged: Path, spool: Path, sha256: str):
    deadline = time.monotonic() + STALL_SECONDS
    while time.monotonic() < deadline:
        for path in (staged, spool):
            try:
                return path.open("rb")
            except FileNotFoundError:
                continue
        if await asyncio.to_thread(relay.relay_state, sha256) == "failed":
            break
        await asyncio.sleep(0.05)
    return None


async def _stream(model: Model) -> AsyncIterator[bytes]:
    """Yield the file as it arrives; bounded by one chunk in memory."""
    staged, spool = placement.staging_path(model.sha256), relay.relay_path(model.sha256)
    source = await _open_when_present(staged, spool, model.sha256)
    if source is None:
        logger.warning("model %s: download failed, no replica uploaded the file", model.model_id)
        await database_sync_to_async(placement.remove_staging_reader)(model.sha256)
        return
    sent, last_progress = 0, time.monotonic()
    try:
        while sent < model.size:
            chunk = await asyncio.to_thread(source.read, CHUNK_BYTES)
            if chunk:
                sent += len(chunk)
                last_progress = time.monotonic()
                yield chunk
                continue
            if time.monotonic() - last_progress > STALL_SECONDS:
                logger.warning("model %s: download stalled at %d of %d bytes", model.model_id, sent, model.size)
                return
            await asyncio.sleep(0.02)
    finally:
        source.close()
        await database_sync_to_async(placement.remove_staging_reader)(model.sha256)
    logger.info("model %s: downloaded %d bytes", model.model_id, sent)
