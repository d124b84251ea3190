"""Verified inference: compare two replicas' outputs and record disagreements.

A node that returns wrong outputs, through a fault or on purpose, shows up as
mismatches on its record, where an operator can find it.
"""

from __future__ import annotations

import logging

import numpy as np
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from safetensors import SafetensorError
from safetensors.numpy import load

from apps.registry.models import Node

logger = logging.getLogger(__name__)

MAX_RECORDED = 50


def compare_outputs(first: bytes, second: bytes) -> str:
    """Return an empty string when both outputs agree, else what differs."""
    try:
        a, b = load(first), load(second)
    except SafetensorError as exc:
        return f"an output is not valid safetensors: {exc}"
    if a.keys() != b.keys():
        return f"output names differ: {sorted(a)} and {sorted(b)}"
    for name in sorted(a):
        if a[name].shape != b[name].shape or a[name].dtype != b[name].dtype:
            return f"output {name!r} differs in shape or dtype: {a[name].shape} {a[name].dtype} and {b[name].shape} {b[name].dtype}"
        if not np.allclose(a[name], b[name], rtol=settings.GRID["VERIFY_RTOL"], atol=settings.GRID["VERIFY_ATOL"], equal_nan=True):
            worst = float(np.nanmax(np.abs(a[name].astype(np.float64) - b[name].astype(np.float64))))
            return f"output {name!r} differs by up to {worst:.6g}"
    return ""


def record_mismatch(*, model_id: str, job_ids: list[str], node_ids: list[int], detail: str) -> None:
    """Append the mismatch to both nodes' records, newest first."""
    entry = {"model_id": model_id, "jobs": job_ids, "nodes": node_ids, "detail": detail, "at": timezone.now().isoformat()}
    with transaction.atomic():
        for node in Node.objects.select_for_update().filter(pk__in=node_ids):
            node.verification_mismatches = [entry, *node.verification_mismatches][:MAX_RECORDED]
            node.save(update_fields=["verification_mismatches"])
    logger.warning("model %s: replicas on nodes %s disagree (jobs %s): %s", model_id, node_ids, job_ids, detail)
