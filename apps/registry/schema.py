"""OpenAPI descriptions of the node, search and tag endpoints, attached at startup.

RegistryConfig.ready imports this module, so the views stay short.
"""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import serializers

from apps.registry.serializers import DatasetSerializer, NodeSerializer
from apps.registry.views import (
    TAG,
    DisconnectNodesView,
    NodeDetailView,
    NodeListView,
    SearchView,
    TagListView,
)
from gridsite.schema import error_responses


class NodeListSerializer(serializers.Serializer):
    count = serializers.IntegerField()
    results = NodeSerializer(many=True)


class DatasetListSerializer(serializers.Serializer):
    count = serializers.IntegerField()
    results = DatasetSerializer(many=True)


class TagListSerializer(serializers.Serializer):
    tags = serializers.ListField(
        child=serializers.CharField(), help_text="The dataset tags, sorted."
    )
    counts = serializers.DictField(
        child=serializers.IntegerField(), help_text="How many datasets carry each tag."
    )


class DisconnectedSerializer(serializers.Serializer):
    disconnected = serializers.IntegerField(
        help_text="How many nodes were asked to disconnect."
    )


_ONE_TAG = TAG.pattern.removeprefix("^").removesuffix("$")
TAGS_PATTERN = f"^{_ONE_TAG}(,{_ONE_TAG})*$"

INCLUDE_OFFLINE = OpenApiParameter(
    "include_offline",
    OpenApiTypes.BOOL,
    description="Also include datasets on offline and draining nodes: 1, true, yes or on.",
)

NODE_EXAMPLE = {
    "id": 1,
    "name": "node-a",
    "status": "online",
    "last_heartbeat": "2026-12-04T17:09:30Z",
    "connected_since": "2026-12-04T17:00:00Z",
    "protocol_version": 1,
    "capabilities": {
        "torch": "2.13.0+cpu",
        "cpu_count": 2,
        "memory_bytes": 25000000000,
        "device": "cpu",
    },
    "concurrency": 2,
    "in_flight": 0,
    "models": ["digits-cnn"],
}

DATASET_EXAMPLE = {
    "name": "digits-test",
    "tags": ["digits", "test"],
    "description": "scikit-learn digits, held-out split",
    "rows": 360,
    "tensors": {
        "images": {"dtype": "float32", "shape": [360, 1, 8, 8]},
        "labels": {"dtype": "int64", "shape": [360]},
    },
    "label_tensor": "labels",
    "node": 1,
    "node_name": "node-a",
    "node_status": "online",
}

NODE_STATUS_NOTE = (
    "`status` is `online` (connected, takes work), `draining` (connected, gets no new work) or "
    "`offline`. Offline nodes stay listed."
)

extend_schema_view(
    get=extend_schema(
        operation_id="nodes_list",
        summary="List nodes",
        description="Every registered node with its status, load and ready models. Needs the `read` scope.\n\n"
        + NODE_STATUS_NOTE,
        responses={
            200: OpenApiResponse(
                NodeListSerializer,
                examples=[
                    OpenApiExample(
                        "one node", value={"count": 1, "results": [NODE_EXAMPLE]}
                    )
                ],
            ),
            **error_responses(),
        },
    )
)(NodeListView)

extend_schema_view(
    get=extend_schema(
        operation_id="nodes_retrieve",
        summary="Get a node",
        description="One node. Needs the `read` scope.\n\n" + NODE_STATUS_NOTE,
        parameters=[
            OpenApiParameter(
                "node_id",
                OpenApiTypes.INT,
                OpenApiParameter.PATH,
                description="The node's id.",
            )
        ],
        responses={
            200: OpenApiResponse(
                NodeSerializer, examples=[OpenApiExample("online", value=NODE_EXAMPLE)]
            ),
            **error_responses(404),
        },
    )
)(NodeDetailView)

extend_schema_view(
    post=extend_schema(
        operation_id="nodes_disconnect",
        summary="Disconnect every node",
        description=(
            "Ask every connected agent to disconnect cleanly and mark the nodes offline; their "
            "running jobs fail over where a replica remains. A disconnected agent does not reconnect "
            "until it is restarted. Staff only, with the `admin` scope. The request has no body."
        ),
        request=None,
        responses={
            200: OpenApiResponse(
                DisconnectedSerializer,
                examples=[OpenApiExample("three nodes", value={"disconnected": 3})],
            ),
            **error_responses(),
        },
    )
)(DisconnectNodesView)

extend_schema_view(
    get=extend_schema(
        operation_id="search_datasets",
        summary="Search datasets by tag",
        description=(
            "Datasets that carry every given tag, on online nodes unless `include_offline` is set. "
            "The data stays on the nodes; this returns its metadata. Needs the `read` scope."
        ),
        parameters=[
            OpenApiParameter(
                "tags",
                OpenApiTypes.STR,
                required=True,
                pattern=TAGS_PATTERN,
                description="Comma-separated tags, each 1-64 letters, digits, '_', '.', ':' or '-'.",
                examples=[OpenApiExample("two tags", value="digits,test")],
            ),
            INCLUDE_OFFLINE,
        ],
        responses={
            200: OpenApiResponse(
                DatasetListSerializer,
                examples=[
                    OpenApiExample(
                        "one dataset", value={"count": 1, "results": [DATASET_EXAMPLE]}
                    )
                ],
            ),
            **error_responses(400),
        },
    )
)(SearchView)

extend_schema_view(
    get=extend_schema(
        operation_id="tags_list",
        summary="List dataset tags",
        description=(
            "The tags of the datasets on online nodes, or on every node with "
            "`include_offline`, with how many datasets carry each. Needs the `read` scope."
        ),
        parameters=[INCLUDE_OFFLINE],
        responses={
            200: OpenApiResponse(
                TagListSerializer,
                examples=[
                    OpenApiExample(
                        "tags",
                        value={
                            "tags": ["digits", "test"],
                            "counts": {"digits": 3, "test": 3},
                        },
                    )
                ],
            ),
            **error_responses(),
        },
    )
)(TagListView)
