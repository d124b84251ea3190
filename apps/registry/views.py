"""REST endpoints for nodes, datasets and tag search."""

from __future__ import annotations

import logging
import re

from django.db.models import Prefetch
from rest_framework.permissions import IsAdminUser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.inference.delivery import send_to_node_sync
from apps.inference.models import Placement
from apps.registry import services
from apps.registry.models import Dataset, Node
from apps.registry.serializers import DatasetSerializer, NodeSerializer
from gridsite.errors import ApiError

logger = logging.getLogger(__name__)

TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def nodes_with_models():
    return Node.objects.prefetch_related(Prefetch("placements", queryset=Placement.objects.select_related("model")))


class NodeListView(APIView):
    def get(self, request: Request) -> Response:
        data = NodeSerializer(nodes_with_models(), many=True).data
        return Response({"count": len(data), "results": data})


class NodeDetailView(APIView):
    def get(self, request: Request, node_id: int) -> Response:
        node = nodes_with_models().filter(pk=node_id).first()
        if node is None:
            raise ApiError(404, "not_found", f"node {node_id} not found; GET /api/nodes/ lists the nodes")
        return Response(NodeSerializer(node).data)


class DisconnectNodesView(APIView):
    """Ask every connected agent to disconnect cleanly. Staff only."""

    permission_classes = [IsAdminUser]

    def post(self, request: Request) -> Response:
        count = 0
        for node_id in Node.objects.exclude(status=Node.Status.OFFLINE).values_list("pk", flat=True):
            delivered = send_to_node_sync(node_id, {"type": "agent.disconnect", "reason": "disconnected by an operator"})
            # The consumer marks the node offline itself; this covers nodes
            # whose consumer is gone.
            services.mark_offline(node_id, "disconnected by an operator")
            count += 1
            logger.info("node %s disconnect requested by user %s (delivered: %s)", node_id, request.user.pk, delivered)
        return Response({"disconnected": count})


def parse_tags(raw: str | None) -> list[str]:
    if raw is None or not raw.strip():
        raise ApiError(400, "invalid_input", "tags is required: pass ?tags=a,b with one or more comma-separated tags", "tags")
    tags = [tag.strip() for tag in raw.split(",")]
    for tag in tags:
        if not TAG.match(tag):
            raise ApiError(400, "invalid_input", f"tag {tag!r} is invalid; tags are 1-64 letters, digits, '_', '.', ':' or '-'", "tags")
    return tags


class SearchView(APIView):
    def get(self, request: Request) -> Response:
        tags = parse_tags(request.query_params.get("tags"))
        datasets = Dataset.objects.select_related("node").filter(tags__contains=tags)
        if request.query_params.get("include_offline", "").lower() not in {"1", "true", "yes"}:
            datasets = datasets.filter(node__status=Node.Status.ONLINE)
        data = DatasetSerializer(datasets, many=True).data
        return Response({"count": len(data), "results": data})


class TagListView(APIView):
    def get(self, request: Request) -> Response:
        tags = sorted({tag for tags in Dataset.objects.values_list("tags", flat=True) for tag in tags})
        return Response({"tags": tags})
