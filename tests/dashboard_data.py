"""Rows for the dashboard tests, made directly in PostgreSQL."""

from __future__ import annotations

import datetime as dt
import hashlib

from django.contrib.auth import get_user_model
from django.utils import timezone

from apps.inference.models import InferenceJob, Model, Placement
from apps.registry.models import Node

HOSTILE = "<script>alert(1)</script>"
PASSWORD = "correct horse battery staple"


def make_user(username: str, *, staff: bool = False):
    return get_user_model().objects.create_user(
        username, password=PASSWORD, is_staff=staff
    )


def make_node(name: str, status: str = Node.Status.ONLINE) -> Node:
    node, _ = Node.enroll(name)
    Node.objects.filter(pk=node.pk).update(status=status)
    node.refresh_from_db()
    return node


def make_model(
    model_id: str, owner, *, replicas: int = 1, content: bytes | None = None
) -> Model:
    sha256 = hashlib.sha256(content or model_id.encode()).hexdigest()
    return Model.objects.create(
        model_id=model_id,
        owner=owner,
        sha256=sha256,
        size=1234,
        input_signature=[{"name": "input", "dtype": "float32", "shape": [None, 4]}],
        replicas=replicas,
        allow_remote_inference=True,
    )


def place(model: Model, node: Node, status: str = Placement.Status.READY) -> Placement:
    return Placement.objects.create(
        model=model, node=node, sha256=model.sha256, status=status
    )


def make_job(
    model: Model,
    *,
    node: Node | None = None,
    status: str = InferenceJob.Status.SUCCEEDED,
    latency_ms: float | None = 10.0,
    attempts: int = 1,
    age: dt.timedelta = dt.timedelta(seconds=5),
    error_code: str = "",
    error: str = "",
) -> InferenceJob:
    """A job created ``age`` ago that took ``latency_ms`` (None: not finished)."""
    created = timezone.now() - age
    finished = (
        None if latency_ms is None else created + dt.timedelta(milliseconds=latency_ms)
    )
    job = InferenceJob.objects.create(
        model=model,
        node=node,
        status=status,
        attempts=attempts,
        deadline=created + dt.timedelta(seconds=30),
        error_code=error_code,
        error=error,
    )
    # created is auto_now_add, so set it after the insert.
    InferenceJob.objects.filter(pk=job.pk).update(created=created, finished=finished)
    job.refresh_from_db()
    return job
