from __future__ import annotations

from rest_framework import serializers

from apps.registry.models import Dataset, Node


class NodeSerializer(serializers.ModelSerializer):
    models = serializers.SerializerMethodField()

    class Meta:
        model = Node
        fields = [
            "id",
            "name",
            "status",
            "last_heartbeat",
            "connected_since",
            "protocol_version",
            "capabilities",
            "concurrency",
            "in_flight",
            "models",
            "verification_mismatches",
        ]

    def get_models(self, obj: Node) -> list[str]:
        return sorted(p.model.model_id for p in obj.placements.all() if p.status == "ready")


class DatasetSerializer(serializers.ModelSerializer):
    node_name = serializers.CharField(source="node.name", read_only=True)
    node_status = serializers.CharField(source="node.status", read_only=True)

    class Meta:
        model = Dataset
        fields = ["name", "tags", "description", "rows", "tensors", "label_tensor", "node", "node_name", "node_status"]
