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

from apps.inference.models import Model, Placement
from apps.inference.serializers import ModelSerializer, ModelUploadSerializer
from apps.inference.services import placement
from apps.inference.signature import SignatureError, parse_signature
from gridproto.pt2 import ArchiveError, check_archive
from gridsite.errors import ApiError

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
        if Model.objects.filter(model_id=data["model_id"]).exists():
            raise ApiError(409, "conflict", f"model {data['model_id']!r} already exists; delete it first or choose another model_id", "model_id")

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
                )
                transaction.on_commit(lambda: _enqueue_placement(model.pk))
        except IntegrityError:
            raise ApiError(409, "conflict", f"model {data['model_id']!r} already exists; delete it first or choose another model_id", "model_id") from None
        logger.info("model %s uploaded by user %s: %s bytes, sha256 %s, %s replicas", model.model_id, request.user.pk, size, sha256, model.replicas)
        return Response(ModelSerializer(get_model_or_404(model.model_id)).data, status=status.HTTP_201_CREATED)


def _enqueue_placement(model_pk: int) -> None:
    from apps.inference.tasks import place_model

    place_model.delay(model_pk)


class ModelDetailView(APIView):
    def get(self, request: Request, model_id: str) -> Response:
        return Response(ModelSerializer(get_model_or_404(model_id)).data)
