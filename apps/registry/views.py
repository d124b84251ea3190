"""REST endpoints for nodes, datasets and tag search."""

from __future__ import annotations

import logging
import re
from collections import Counter

from django.db.models import Prefetch
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.accounts.permissions import ADMIN, IsStaff, TokenScope
from apps.inference.models import Placement
from apps.registry import operations
from apps.registry.models import Dataset, Node
from apps.registry.serializers import DatasetSerializer, NodeSerializer
from gridproto.datasets import MAX_TAGS
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

    permission_classes = [IsAuthenticated, IsStaff, TokenScope]
    write_scope = ADMIN

    def post(self, request: Request) -> Response:
        count = operations.disconnect_all(actor=f"user {request.user.pk}")
        return Response({"disconnected": count})


def parse_tags(raw: str | None) -> list[str]:
    """Split ?tags=a,b into lowercase tags; raise a 400 naming the bad tag."""
    if raw is None or not raw.strip():
        raise ApiError(400, "invalid_input", "tags is required: pass ?tags=a,b with one or more comma-separated tags", "tags")
    # Agents store tags in lowercase, so the search ignores case.
    tags = [tag.strip().lower() for tag in raw.split(",")]
    if len(tags) > MAX_TAGS:
        raise ApiError(400, "invalid_input", f"tags lists {len(tags)} tags; a search takes at most {MAX_TAGS}", "tags")
    for tag in tags:
        if not TAG.match(tag):
            raise ApiError(400, "invalid_input", f"tag {tag!r} is invalid; tags are 1-64 letters, digits, '_', '.', ':' or '-'", "tags")
    return tags


def parse_flag(request: Request, name: str) -> bool:
    """Read an optional boolean query parameter; raise a 400 for a value that is not one."""
    raw = request.query_params.get(name, "")
    value = raw.strip().lower()
    if value in {"", "0", "false", "no", "off"}:
        return False
    if value in {"1", "true", "yes", "on"}:
        return True
    raise ApiError(400, "invalid_input", f"{name}={raw!r} is not a boolean; pass {name}=1 or {name}=0", name)


class SearchView(APIView):
    def get(self, request: Request) -> Response:
        """Datasets carrying every given tag. Offline and draining nodes' datasets
        are left out unless include_offline is set; each result has node_status."""
        tags = parse_tags(request.query_params.get("tags"))
        include_offline = parse_flag(request, "include_offline")
        datasets = Dataset.objects.select_related("node").filter(tags__contains=tags)
        if not include_offline:
            datasets = datasets.filter(node__status=Node.Status.ONLINE)
        data = DatasetSerializer(datasets, many=True).data
        return Response({"count": len(data), "results": data})


class TagListView(APIView):
    def get(self, request: Request) -> Response:
        """Tags of the datasets on online nodes (on every node with include_offline),
        with the number of datasets that carry each."""
        datasets = Dataset.objects.all()
        if not parse_flag(request, "include_offline"):
            datasets = datasets.filter(node__status=Node.Status.ONLINE)
        counts = Counter(tag for tags in datasets.values_list("tags", flat=True) for tag in tags)
        return Response({"tags": sorted(counts), "counts": dict(sorted(counts.items()))})
