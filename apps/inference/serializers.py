from __future__ import annotations

from rest_framework import serializers

from apps.inference.models import Model, Placement
from apps.registry.models import Node


class PlacementSerializer(serializers.ModelSerializer):
    node_name = serializers.CharField(source="node.name", read_only=True)

    class Meta:
        model = Placement
        fields = ["node", "node_name", "status", "error", "updated"]


def model_status(model: Model) -> tuple[str, str, int]:
    """Return (status, reason, ready replicas) from a model's placements.

    Reads ``model.placements`` with their nodes; prefetch them for lists.
    """
    placements = list(model.placements.all())
    ready = [p for p in placements if p.status == Placement.Status.READY and p.node.status == Node.Status.ONLINE]
    active = [p for p in placements if p.status in (Placement.Status.PENDING, Placement.Status.TRANSFERRING)]
    if len(ready) >= model.replicas:
        return "ready", "", len(ready)
    if not placements and not model.placement_error:
        return "placing", "waiting for the placement task", 0
    if active:
        return "placing", f"{len(ready)} of {model.replicas} replicas ready, {len(active)} in transfer", len(ready)
    if ready:
        return "degraded", model.placement_error or f"{len(ready)} of {model.replicas} replicas ready", len(ready)
    return "failed", model.placement_error or "no replica is ready", 0


class ModelSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    placements = PlacementSerializer(many=True, read_only=True)
    status = serializers.SerializerMethodField()
    status_reason = serializers.SerializerMethodField()
    ready_replicas = serializers.SerializerMethodField()

    class Meta:
        model = Model
        fields = [
            "model_id",
            "owner",
            "format",
            "sha256",
            "size",
            "input_signature",
            "allow_remote_inference",
            "allow_download",
            "replicas",
            "created",
            "status",
            "status_reason",
            "ready_replicas",
            "placements",
        ]

    def _status(self, obj: Model) -> tuple[str, str, int]:
        cache = self.context.setdefault("_status", {})
        if obj.pk not in cache:
            cache[obj.pk] = model_status(obj)
        return cache[obj.pk]

    def get_status(self, obj: Model) -> str:
        return self._status(obj)[0]

    def get_status_reason(self, obj: Model) -> str:
        return self._status(obj)[1]

    def get_ready_replicas(self, obj: Model) -> int:
        return self._status(obj)[2]


class ModelUploadSerializer(serializers.Serializer):
    file = serializers.FileField(help_text="The program saved with torch.export.save (.pt2).")
    model_id = serializers.RegexField(
        r"^[a-z0-9][a-z0-9_-]{0,99}$",
        error_messages={"invalid": "model_id must be 1-100 characters of lowercase letters, digits, '-' and '_', starting with a letter or digit"},
    )
    allow_remote_inference = serializers.BooleanField(default=False)
    allow_download = serializers.BooleanField(default=False)
    replicas = serializers.IntegerField(default=1, min_value=1, max_value=64)
    input_signature = serializers.CharField(help_text='JSON list such as [{"name": "input", "dtype": "float32", "shape": [null, 1, 8, 8]}].')
