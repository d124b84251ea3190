from __future__ import annotations

import uuid

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

MODEL_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,99}$"
model_id_validator = RegexValidator(
    MODEL_ID_PATTERN,
    "model_id must be 1-100 characters of lowercase letters, digits, '-' and '_', starting with a letter or digit",
)


class Model(models.Model):
    """A served model's metadata. Its weights live only on the nodes."""

    class Format(models.TextChoices):
        TORCH_EXPORT = "torch.export"

    model_id = models.CharField(max_length=100, unique=True, validators=[model_id_validator])
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="grid_models")
    format = models.CharField(max_length=20, choices=Format.choices, default=Format.TORCH_EXPORT)
    # The active version: the hash of the file that serves requests.
    sha256 = models.CharField(max_length=64, db_index=True)
    size = models.PositiveBigIntegerField()
    # [{"name": "input", "dtype": "float32", "shape": [null, 1, 8, 8]}], null
    # marking a dynamic dimension.
    input_signature = models.JSONField()
    allow_remote_inference = models.BooleanField(default=False)
    allow_download = models.BooleanField(default=False)
    replicas = models.PositiveSmallIntegerField(default=1)
    # Placement constraints: only nodes reporting this device (blank: any) and
    # at least this much memory receive a replica.
    device = models.CharField(max_length=20, blank=True)
    min_memory_bytes = models.PositiveBigIntegerField(default=0)
    # A new version being rolled out: it becomes the active version above once
    # it is ready on enough replicas. Blank when no rollout runs.
    pending_sha256 = models.CharField(max_length=64, blank=True)
    pending_size = models.PositiveBigIntegerField(default=0)
    pending_signature = models.JSONField(null=True, blank=True)
    # Why placement could not reach the wanted replicas, for the API and the dashboard.
    placement_error = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model_id"]

    def __str__(self) -> str:
        return self.model_id


class Placement(models.Model):
    """One replica of a model on one node."""

    class Status(models.TextChoices):
        PENDING = "pending"
        TRANSFERRING = "transferring"
        READY = "ready"
        FAILED = "failed"

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="placements")
    node = models.ForeignKey("registry.Node", on_delete=models.CASCADE, related_name="placements")
    # The version (file hash) this replica holds.
    sha256 = models.CharField(max_length=64, db_index=True, default="")
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING, db_index=True)
    error = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model", "node__name"]
        constraints = [models.UniqueConstraint(fields=["model", "node", "sha256"], name="placement_unique_per_version")]

    def __str__(self) -> str:
        return f"{self.model.model_id}@{self.node.name} ({self.status})"


class InferenceJob(models.Model):
    """One inference request. Inputs and outputs live in Redis, never here."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="jobs")
    # The model version that runs this job, fixed when the job is created.
    sha256 = models.CharField(max_length=64, blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    # The node running the current attempt, then the node that answered.
    node = models.ForeignKey("registry.Node", on_delete=models.SET_NULL, null=True, blank=True, related_name="jobs")
    attempts = models.PositiveSmallIntegerField(default=0)
    # Nodes that failed this job, so failover never sends it back to them.
    failed_nodes = models.JSONField(default=list, blank=True)
    # Channel of the process waiting for the result; blank when nobody waits.
    reply_channel = models.CharField(max_length=200, blank=True)
    input_bytes = models.PositiveBigIntegerField(default=0)
    error_code = models.CharField(max_length=40, blank=True)
    error = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)
    dispatched = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)
    deadline = models.DateTimeField()
    # Time the node spent computing, as it reported it.
    compute_ms = models.FloatField(null=True, blank=True)
    # For a data-local job, the name of the dataset it runs over on its node;
    # blank for a request that sent its inputs. A data-local job never moves
    # to another node, because only its node holds the rows.
    dataset = models.CharField(max_length=100, blank=True)

    class Meta:
        ordering = ["-created"]
        indexes = [
            models.Index(fields=["node", "status"], name="job_node_status"),
            models.Index(fields=["status", "deadline"], name="job_status_deadline"),
            # The dashboard lists recent jobs and computes rates and latencies by time window.
            models.Index(fields=["created"], name="job_created"),
        ]

    def __str__(self) -> str:
        return f"job {self.id} ({self.status})"
