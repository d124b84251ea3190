"""OpenAPI descriptions of the model endpoints, attached to the views at startup.

They live here rather than as decorators in views.py so that the views stay
short; InferenceConfig.ready imports this module. The inference endpoint is
described in gridsite.schema, because it is not a DRF view.
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

from apps.inference.serializers import (
    ModelSerializer,
    ModelUpdateSerializer,
    ModelUploadSerializer,
    PlacementSerializer,
)
from apps.inference.views import ModelDetailView, ModelListView, ModelNodesView
from gridsite.schema import error_responses


class ModelListSerializer(serializers.Serializer):
    count = serializers.IntegerField()
    results = ModelSerializer(many=True)


class ReplicaSerializer(PlacementSerializer):
    node_status = serializers.CharField(
        source="node.status", help_text="online, draining or offline"
    )

    class Meta(PlacementSerializer.Meta):
        fields = [*PlacementSerializer.Meta.fields, "node_status"]


class ModelNodesSerializer(serializers.Serializer):
    model_id = serializers.CharField()
    count = serializers.IntegerField()
    results = ReplicaSerializer(many=True)


MODEL_EXAMPLE = {
    "model_id": "digits-cnn",
    "owner": "alice",
    "format": "torch.export",
    "sha256": "9f2c6a1be1c4b5e0d2f8a7c3e6b1d4f09a8c7e6d5b4a39281706f5e4d3c2b1a0",
    "size": 35057,
    "input_signature": [{"name": "x", "dtype": "float32", "shape": [None, 1, 8, 8]}],
    "allow_remote_inference": True,
    "allow_download": False,
    "replicas": 2,
    "created": "2026-12-04T17:09:00Z",
    "status": "ready",
    "status_reason": "",
    "ready_replicas": 2,
    "health": "healthy",
    "placements": [
        {
            "node": 1,
            "node_name": "node-a",
            "status": "ready",
            "error": "",
            "updated": "2026-12-04T17:09:02Z",
        },
        {
            "node": 2,
            "node_name": "node-b",
            "status": "ready",
            "error": "",
            "updated": "2026-12-04T17:09:02Z",
        },
    ],
}

MODEL_ID = OpenApiParameter(
    "model_id",
    OpenApiTypes.STR,
    OpenApiParameter.PATH,
    description="The model_id given when the model was served.",
)

STATUS_NOTE = (
    "`status` is `placing` while replicas are transferred, `ready` when `replicas` of them are ready "
    "on online nodes, `degraded` when fewer are and none is still in transfer, and `failed` when "
    "none is; `status_reason` says why."
)

extend_schema_view(
    get=extend_schema(
        operation_id="models_list",
        summary="List models",
        description="Every served model with its placements. Needs the `read` scope.\n\n"
        + STATUS_NOTE,
        parameters=[
            OpenApiParameter(
                "search",
                OpenApiTypes.STR,
                description="Only models whose model_id contains this text, ignoring case.",
            )
        ],
        responses={
            200: OpenApiResponse(
                ModelListSerializer,
                examples=[
                    OpenApiExample(
                        "one model", value={"count": 1, "results": [MODEL_EXAMPLE]}
                    )
                ],
            ),
            **error_responses(),
        },
    ),
    post=extend_schema(
        operation_id="models_create",
        summary="Serve a model",
        description=(
            "Upload a program saved with `torch.export.save` (.pt2) as multipart form data. The gateway "
            "checks the archive without unpickling it, stores only its metadata, and places it on "
            "`replicas` online nodes in the background: poll `GET /api/models/{model_id}/` until "
            "`status` is `ready`. `input_signature` lists the program's inputs in order, with `null` "
            "for a dynamic dimension. Needs the `serve` scope. The upload limit is "
            "GRID_MAX_UPLOAD_BYTES.\n\n"
            "Uploading to a model_id that you already serve rolls the file out as the model's new "
            "version (202): the old version serves until the new one is ready on enough replicas."
        ),
        request={"multipart/form-data": ModelUploadSerializer},
        examples=[
            OpenApiExample(
                "digits CNN",
                request_only=True,
                value={
                    "model_id": "digits-cnn",
                    "input_signature": '[{"name": "x", "dtype": "float32", "shape": [null, 1, 8, 8]}]',
                    "replicas": 2,
                    "allow_remote_inference": True,
                    "allow_download": False,
                },
            )
        ],
        responses={
            201: OpenApiResponse(
                ModelSerializer,
                description="The model, placing.",
                examples=[
                    OpenApiExample(
                        "placing",
                        value={
                            **MODEL_EXAMPLE,
                            "status": "placing",
                            "status_reason": "waiting for the placement task",
                            "ready_replicas": 0,
                            "health": "unavailable",
                            "placements": [],
                        },
                    )
                ],
            ),
            202: OpenApiResponse(
                ModelSerializer,
                description="The existing model, rolling out the new version.",
            ),
            **error_responses(400, 409, 413, 415),
        },
    ),
)(ModelListView)

extend_schema_view(
    get=extend_schema(
        operation_id="models_retrieve",
        summary="Get a model",
        description="One model with its placements. Needs the `read` scope.\n\n"
        + STATUS_NOTE,
        parameters=[MODEL_ID],
        responses={
            200: OpenApiResponse(
                ModelSerializer, examples=[OpenApiExample("ready", value=MODEL_EXAMPLE)]
            ),
            **error_responses(404),
        },
    ),
    patch=extend_schema(
        operation_id="models_partial_update",
        summary="Change a model's permissions",
        description=(
            "Change who may run or download the model. Only its owner or staff may, with the `serve` "
            "scope. Fields left out keep their value; other fields are rejected."
        ),
        parameters=[MODEL_ID],
        request=ModelUpdateSerializer,
        examples=[
            OpenApiExample(
                "open to others",
                value={"allow_remote_inference": True},
                request_only=True,
            )
        ],
        responses={
            200: OpenApiResponse(
                ModelSerializer,
                examples=[OpenApiExample("changed", value=MODEL_EXAMPLE)],
            ),
            **error_responses(400, 404, 413, 415),
        },
    ),
    delete=extend_schema(
        operation_id="models_destroy",
        summary="Delete a model",
        description=(
            "Evict the model from every node that holds it and delete it, with its placements and "
            "jobs. Only its owner or staff may, with the `serve` scope."
        ),
        parameters=[MODEL_ID],
        responses={
            204: OpenApiResponse(description="Deleted."),
            **error_responses(404),
        },
    ),
)(ModelDetailView)

extend_schema_view(
    get=extend_schema(
        operation_id="models_nodes",
        summary="Find the nodes that hold a model",
        description=(
            "The ready replicas of a model, on online nodes unless `include_offline` is set: where "
            "a query for the model resolves. Needs the `read` scope."
        ),
        parameters=[
            MODEL_ID,
            OpenApiParameter(
                "include_offline",
                OpenApiTypes.BOOL,
                description="Also list replicas on offline and draining nodes.",
            ),
        ],
        responses={
            200: OpenApiResponse(
                ModelNodesSerializer,
                examples=[
                    OpenApiExample(
                        "two replicas",
                        value={
                            "model_id": "digits-cnn",
                            "count": 2,
                            "results": [
                                {**placement, "node_status": "online"}
                                for placement in MODEL_EXAMPLE["placements"]
                            ],
                        },
                    )
                ],
            ),
            **error_responses(404),
        },
    )
)(ModelNodesView)
