"""Admin pages for models, placements and inference jobs.

Deleting a model, here as on the dashboard, goes through
apps.inference.operations.delete_model, so the nodes evict it first.
"""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from apps.inference import operations
from apps.inference.models import InferenceJob, Model, Placement


def _actor(request: HttpRequest) -> str:
    return f"user {request.user.pk} ({request.user.get_username()}) in the admin"


class PlacementInline(admin.TabularInline):
    model = Placement
    extra = 0
    can_delete = False
    fields = ("node", "status", "error", "updated")
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(Model)
class ModelAdmin(admin.ModelAdmin):
    list_display = (
        "model_id",
        "owner",
        "short_sha256",
        "size",
        "replicas",
        "allow_remote_inference",
        "allow_download",
        "created",
    )
    list_filter = ("allow_remote_inference", "allow_download", "format")
    list_select_related = ("owner",)
    search_fields = ("model_id", "sha256", "owner__username")
    readonly_fields = (
        "model_id",
        "owner",
        "format",
        "sha256",
        "size",
        "input_signature",
        "placement_error",
        "created",
    )
    inlines = (PlacementInline,)
    actions = ("replace", "delete_and_evict")

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Models arrive through POST /api/models/, which checks and stages the file.
        return False

    def get_actions(self, request: HttpRequest):
        actions = super().get_actions(request)
        # Django's bulk delete would skip eviction; delete_and_evict replaces it.
        actions.pop("delete_selected", None)
        return actions

    @admin.display(description="version")
    def short_sha256(self, model: Model) -> str:
        return model.sha256[:12]

    @admin.action(description="Re-place selected models", permissions=["change"])
    def replace(self, request: HttpRequest, queryset: QuerySet[Model]) -> None:
        for model in queryset:
            operations.replace_model(model_pk=model.pk, actor=_actor(request))
        self.message_user(request, f"Queued placement of {queryset.count()} models.")

    @admin.action(
        description="Delete selected models and evict them from nodes",
        permissions=["delete"],
    )
    def delete_and_evict(self, request: HttpRequest, queryset: QuerySet[Model]) -> None:
        names = []
        for model in list(queryset):
            operations.delete_model(model_pk=model.pk, actor=_actor(request))
            names.append(model.model_id)
        self.message_user(request, f"Deleted {len(names)} models: {', '.join(names)}.")

    def delete_model(self, request: HttpRequest, obj: Model) -> None:
        operations.delete_model(model_pk=obj.pk, actor=_actor(request))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Model]) -> None:
        for model in list(queryset):
            operations.delete_model(model_pk=model.pk, actor=_actor(request))


@admin.register(Placement)
class PlacementAdmin(admin.ModelAdmin):
    list_display = ("model", "node", "status", "updated")
    list_filter = ("status", "node")
    list_select_related = ("model", "node")
    search_fields = ("model__model_id", "model__sha256", "node__name")
    readonly_fields = ("model", "node", "status", "error", "created", "updated")

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Placement creates replicas itself; re-place the model instead.
        return False


@admin.register(InferenceJob)
class InferenceJobAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "model",
        "status",
        "node",
        "attempts",
        "error_code",
        "created",
        "finished",
    )
    list_filter = ("status", "error_code", "node", "model")
    list_select_related = ("model", "node")
    search_fields = ("=id", "model__model_id", "node__name", "error")
    date_hierarchy = "created"
    readonly_fields = tuple(field.name for field in InferenceJob._meta.fields)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        # Jobs are a record of what happened; only dispatch changes them.
        return False
