from __future__ import annotations

from rest_framework import serializers

from apps.inference.models import Model, Placement
from apps.registry.models import Node


class PlacementSerializer(serializers.ModelSerializer):
    node_name = serializers.CharField(source="node.name", read_only=True)

    class Meta:
        model = Placement
        fields = ["node", "node_name", "sha256", "status", "error", "updated"]


def model_status(model: Model) -> tuple[str, str, int]:
    """Return (status, reason, ready replicas) from a model's placements.

    Reads ``model.placements`` with their nodes; prefetch them for lists.
    """
    placements = [p for p in model.placements.all() if p.sha256 == model.sha256]
    ready = [p for p in placements if p.status == Placement.Status.READY and p.node.status == Node.Status.ONLINE]
    active = [p for p in placements if p.status in (Placement.Status.PENDING, Placement.Status.TRANSFERRING)]
    if model.pending_sha256:
        rolling = [p for p in model.placements.all() if p.sha256 == model.pending_sha256 and p.status == Placement.Status.READY]
        return "placing", f"rolling out version {model.pending_sha256[:12]}: {len(rolling)} of {model.replicas} replicas ready", len(ready)
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
    version = serializers.CharField(source="sha256", read_only=True, help_text="The active version: the SHA-256 of the file that serves requests.")
    pending_version = serializers.CharField(source="pending_sha256", read_only=True, allow_blank=True, help_text="The version being rolled out, or blank.")
    placements = PlacementSerializer(many=True, read_only=True)
    status = serializers.SerializerMethodField()
    status_reason = serializers.SerializerMethodField()
    ready_replicas = serializers.SerializerMethodField()
    health = serializers.SerializerMethodField(help_text="healthy (all wanted replicas ready), degraded (fewer) or unavailable (none)")

    class Meta:
        model = Model
        fields = [
            "model_id",
            "version",
            "pending_version",
            "owner",
            "format",
            "sha256",
            "size",
            "input_signature",
            "allow_remote_inference",
            "allow_download",
            "replicas",
            "device",
            "min_memory_bytes",
            "created",
            "status",
            "status_reason",
            "ready_replicas",
            "health",
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

    def get_health(self, obj: Model) -> str:
        ready = self._status(obj)[2]
        if ready >= obj.replicas:
            return "healthy"
        return "degraded" if ready else "unavailable"


class ModelUploadSerializer(serializers.Serializer):
    file = serializers.FileField(help_text="The program saved with torch.export.save (.pt2).")
    model_id = serializers.RegexField(
        r"^[a-z0-9][a-z0-9_-]{0,99}$",
        error_messages={"invalid": "model_id must be 1-100 characters of lowercase letters, digits, '-' and '_', starting with a letter or digit"},
    )
    allow_remote_inference = serializers.BooleanField(default=False)
    allow_download = serializers.BooleanField(default=False)
    replicas = serializers.IntegerField(default=1, min_value=1, max_value=64)
    device = serializers.RegexField(r"^[a-z0-9:_-]{0,20}$", required=False, default="", allow_blank=True, help_text="Place only on nodes with this device, such as cpu or cuda; blank for any.")
    min_memory_bytes = serializers.IntegerField(required=False, default=0, min_value=0, max_value=2**63 - 1, help_text="Place only on nodes reporting at least this much memory.")
    input_signature = serializers.CharField(help_text='JSON list such as [{"name": "input", "dtype": "float32", "shape": [null, 1, 8, 8]}].')


class StrictBooleanField(serializers.BooleanField):
    """A JSON true or false; DRF's BooleanField also takes "yes", 1, "on" and more."""

    default_error_messages = {"invalid": "must be true or false, not {input!r}"}

    def to_internal_value(self, data):
        if isinstance(data, bool):
            return data
        self.fail("invalid", input=data)


class ModelUpdateSerializer(serializers.Serializer):
    """The fields a model's owner may change after serving it, sent as JSON."""

    allow_remote_inference = StrictBooleanField(
        required=False, help_text="Let users other than the owner run inference on the model."
    )
    allow_download = StrictBooleanField(required=False, help_text="Let users download the model's .pt2 file.")

    def validate(self, attrs: dict) -> dict:
        if isinstance(self.initial_data, dict):
            unknown = sorted(set(self.initial_data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError(
                    {unknown[0]: f"cannot be changed; send only {', '.join(self.fields)}, or serve a new model_id"}
                )
        return attrs
