"""REST endpoints for models. Inference has its own async view in views_infer."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Prefetch
from rest_framework import status
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.accounts.permissions import SERVE
from apps.inference import operations
from apps.inference.models import Model, Placement
from apps.inference.serializers import ModelSerializer, ModelUpdateSerializer, ModelUploadSerializer, PlacementSerializer
from apps.inference.services import placement
from apps.inference.signature import SignatureError, parse_signature
from apps.registry.models import Node
from apps.registry.views import parse_flag
from gridproto.pt2 import ArchiveError, check_archive
from gridsite.errors import ApiError
from gridsite.parsers import BoundedJSONParser

logger = logging.getLogger(__name__)


def models_with_placements():
    return Model.objects.select_related("owner").prefetch_related(
        Prefetch("placements", queryset=Placement.objects.select_related("node"))
    )


def get_model_or_404(model_id: str) -> Model:
    model = models_with_placements().filter(model_id=model_id).first()
    if model is None:
        raise ApiError(404, "not_found", f"model {model_id!r} not found; GET /api/models/ lists the served models")
    return model


class ModelListView(APIView):
    parser_classes = [MultiPartParser]
    write_scope = SERVE

    def get(self, request: Request) -> Response:
        models = models_with_placements()
        query = request.query_params.get("search")
        if query:
            models = models.filter(model_id__icontains=query[:100])
        data = ModelSerializer(models, many=True).data
        return Response({"count": len(data), "results": data})

    def post(self, request: Request) -> Response:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
        limit = settings.GRID["MAX_UPLOAD_BYTES"]
        if length > limit:
            raise ApiError(413, "payload_too_large", f"the upload is {length} bytes; the limit is {limit} (GRID_MAX_UPLOAD_BYTES)", "file")
        form = ModelUploadSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        data = form.validated_data
        upload = data["file"]
        try:
            signature = parse_signature(data["input_signature"])
        except SignatureError as exc:
            raise ApiError(400, "invalid_input", exc.message, exc.field) from None
        upload.seek(0)
        try:
            archive = check_archive(upload, max_unpacked_bytes=4 * limit)
        except ArchiveError as exc:
            logger.warning("rejected model upload %r from user %s: %s", data["model_id"], request.user.pk, exc)
            raise ApiError(400, "invalid_model", str(exc), "file") from None
        declared = [entry["name"] for entry in signature]
        if declared != archive.input_names:
            raise ApiError(
                400,
                "invalid_input",
                f"input_signature names {declared} do not match the program's inputs {archive.input_names}; list them in that order",
                "input_signature",
            )
        existing = Model.objects.filter(model_id=data["model_id"]).first()
        if existing is not None:
            return self._new_version(request, existing, upload, signature)

        upload.seek(0)
        sha256, size, _ = placement.stage_upload(upload)
        try:
            with transaction.atomic():
                model = Model.objects.create(
                    model_id=data["model_id"],
                    owner=request.user,
                    sha256=sha256,
                    size=size,
                    input_signature=signature,
                    allow_remote_inference=data["allow_remote_inference"],
                    allow_download=data["allow_download"],
                    replicas=data["replicas"],
                    device=data["device"],
                    min_memory_bytes=data["min_memory_bytes"],
                )
                transaction.on_commit(lambda: _enqueue_placement(model.pk))
        except IntegrityError:
            raise ApiError(409, "conflict", f"model {data['model_id']!r} already exists; delete it first or choose another model_id", "model_id") from None
        logger.info("model %s uploaded by user %s: %s bytes, sha256 %s, %s replicas", model.model_id, request.user.pk, size, sha256, model.replicas)
        return Response(ModelSerializer(get_model_or_404(model.model_id)).data, status=status.HTTP_201_CREATED)


    def _new_version(self, request: Request, model: Model, upload, signature: list[dict]) -> Response:
        """Roll out an upload for an existing model_id as its new version.

        The new version serves nothing until it is ready on enough replicas;
        then it replaces the old one, which is evicted afterwards.
        """
        if model.owner_id != request.user.pk and not request.user.is_staff:
            raise ApiError(409, "conflict", f"model {model.model_id!r} belongs to another user; choose another model_id", "model_id")
        upload.seek(0)
        sha256, size, _ = placement.stage_upload(upload)
        if sha256 in (model.sha256, model.pending_sha256):
            placement.release_staging(sha256)
            raise ApiError(409, "conflict", f"model {model.model_id!r} already serves or rolls out this exact file (version {sha256[:12]})", "file")
        with transaction.atomic():
            locked = Model.objects.select_for_update().get(pk=model.pk)
            if locked.pending_sha256:
                raise ApiError(409, "conflict", f"model {model.model_id!r} is still rolling out version {locked.pending_sha256[:12]}; wait for it to finish", "model_id")
            locked.pending_sha256, locked.pending_size, locked.pending_signature = sha256, size, signature
            locked.save(update_fields=["pending_sha256", "pending_size", "pending_signature"])
            transaction.on_commit(lambda: _enqueue_placement(model.pk))
        logger.info("model %s: rolling out version %s (%s bytes) for user %s", model.model_id, sha256, size, request.user.pk)
        return Response(ModelSerializer(get_model_or_404(model.model_id)).data, status=status.HTTP_202_ACCEPTED)


def _enqueue_placement(model_pk: int) -> None:
    from apps.inference.tasks import place_model

    place_model.delay(model_pk)


class ModelDetailView(APIView):
    parser_classes = [BoundedJSONParser]
    write_scope = SERVE

    def get(self, request: Request, model_id: str) -> Response:
        return Response(ModelSerializer(get_model_or_404(model_id)).data)

    def patch(self, request: Request, model_id: str) -> Response:
        """Change who may run or download the model. Owner or staff only."""
        model = get_model_or_404(model_id)
        if model.owner_id != request.user.pk and not request.user.is_staff:
            raise ApiError(403, "forbidden", f"only the owner of model {model_id!r} or staff can change it")
        form = ModelUpdateSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        if form.validated_data:
            Model.objects.filter(pk=model.pk).update(**form.validated_data)
            logger.info("model %s changed by user %s: %s", model_id, request.user.pk, form.validated_data)
        return Response(ModelSerializer(get_model_or_404(model_id)).data)

    def delete(self, request: Request, model_id: str) -> Response:
        """Evict the model from every node and delete it. Owner or staff only."""
        model = get_model_or_404(model_id)
        if model.owner_id != request.user.pk and not request.user.is_staff:
            raise ApiError(403, "forbidden", f"only the owner of model {model_id!r} or staff can delete it")
        operations.delete_model(model_pk=model.pk, actor=f"user {request.user.pk}")
        return Response(status=status.HTTP_204_NO_CONTENT)


class ModelNodesView(APIView):
    """The nodes that hold a ready replica of a model: where a query for it resolves."""

    def get(self, request: Request, model_id: str) -> Response:
        """Replicas of the active version on online nodes; include_offline=1 adds the other nodes."""
        model = get_model_or_404(model_id)
        include_offline = parse_flag(request, "include_offline")
        replicas = [
            p
            for p in model.placements.all()
            if p.status == Placement.Status.READY
            and p.sha256 == model.sha256
            and (include_offline or p.node.status == Node.Status.ONLINE)
        ]
        results = [{**PlacementSerializer(p).data, "node_status": p.node.status} for p in replicas]
        return Response({"model_id": model.model_id, "count": len(results), "results": results})

