from __future__ import annotations

from django.contrib.postgres.fields import ArrayField
from django.contrib.postgres.indexes import GinIndex
from django.db import models

from apps.accounts.tokens import hash_token, new_token


class Node(models.Model):
    """A machine running a node agent. Its token is stored as a SHA-256 only."""

    class Status(models.TextChoices):
        ONLINE = "online"
        OFFLINE = "offline"
        DRAINING = "draining"

    name = models.CharField(max_length=100, unique=True)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    token_revoked = models.BooleanField(default=False)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.OFFLINE, db_index=True)
    # Written when the node connects, disconnects, and by the periodic
    # heartbeat flush; live heartbeats are kept in Redis (apps.registry.presence).
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    # When the status last changed: replicas on a node offline for longer than
    # the grace period are re-created elsewhere.
    status_changed = models.DateTimeField(null=True, blank=True)
    connected_since = models.DateTimeField(null=True, blank=True)
    protocol_version = models.PositiveIntegerField(null=True, blank=True)
    # torch version, CPU count, memory bytes and device, as the agent reported them.
    capabilities = models.JSONField(default=dict, blank=True)
    concurrency = models.PositiveIntegerField(default=1)
    # Inference requests running on the node at its last heartbeat.
    in_flight = models.PositiveIntegerField(default=0)
    # Outputs of this node that disagreed with another replica under verify=2,
    # newest first: [{"model_id", "jobs", "nodes", "detail", "at"}]. The dashboard shows them.
    verification_mismatches = models.JSONField(default=list, blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @classmethod
    def enroll(cls, name: str) -> tuple[Node, str]:
        """Create a node and return it with its plain token, which is not stored."""
        plain = new_token("node")
        return cls.objects.create(name=name, token_hash=hash_token(plain)), plain

    def rotate_token(self) -> str:
        plain = new_token("node")
        self.token_hash = hash_token(plain)
        self.token_revoked = False
        self.save(update_fields=["token_hash", "token_revoked"])
        return plain


class Dataset(models.Model):
    """Metadata of a dataset that lives on a node. The data never leaves it."""

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(max_length=100)
    tags = ArrayField(models.CharField(max_length=64), default=list)
    description = models.TextField(blank=True)
    # name -> {"dtype": ..., "shape": [...]} for each tensor in the file.
    tensors = models.JSONField(default=dict)
    rows = models.PositiveBigIntegerField(default=0)
    label_tensor = models.CharField(max_length=100, blank=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["node__name", "name"]
        constraints = [models.UniqueConstraint(fields=["node", "name"], name="dataset_unique_per_node")]
        indexes = [GinIndex(fields=["tags"], name="dataset_tags_gin")]

    def __str__(self) -> str:
        return f"{self.name}@{self.node.name}"
